//! The Unix socket: binding it safely, accepting connections, and turning
//! the lines each connection sends into state updates and database rows.
//!
//! A connection is read line by line; every complete line is parsed,
//! validated and applied on its own, so one bad line costs exactly that line.
//! Nothing is ever written back to a client, and nothing here waits on the
//! database: rows go to the writer through [`Sink::send`], which never blocks.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::clock::unix_now;
use crate::config::VerifyPid;
use crate::error::{Error, Result};
use crate::event::{parse_line, Event, Reason, Rejection};
use crate::frame::Framer;
use crate::lockfile::{lock_path, warn_unreadable, Acquired, LockFile};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimitedLog;
use crate::row::Row;
use crate::state::State;
use crate::store::Sink;

/// How long connections still open at shutdown may keep sending before they
/// are closed: fire-and-forget clients finish their line well within it.
pub(crate) const DRAIN_GRACE: Duration = Duration::from_millis(1500);

/// Per-connection limits.
#[derive(Debug, Clone)]
pub(crate) struct IngestConfig {
    /// Longest accepted line, in bytes.
    pub(crate) max_line_bytes: usize,
    /// Close a connection after this long without data.
    pub(crate) idle_timeout: Duration,
    /// Close a connection whose unfinished line is this old.
    pub(crate) line_timeout: Duration,
    /// Most connections served at once.
    pub(crate) max_connections: usize,
    /// Peer uids allowed to send; empty allows all.
    pub(crate) allowed_uids: Vec<u32>,
    /// Whether to compare message pids with the peer's pid.
    pub(crate) verify_pid: VerifyPid,
}

/// Everything a connection handler needs, shared by all of them.
pub(crate) struct Ingest {
    /// The live bot registry.
    pub(crate) state: Arc<Mutex<State>>,
    /// Where rows go.
    pub(crate) sink: Sink,
    /// Counters.
    pub(crate) metrics: Metrics,
    /// Limits.
    pub(crate) config: IngestConfig,
    /// Rate limit for warnings about bad input.
    pub(crate) bad_input_log: RateLimitedLog,
}

impl Ingest {
    /// Parses and applies a batch of complete lines read together, taking
    /// the state lock once for all of them.
    /// `peer_pid` is the sending process as the kernel reports it.
    pub(crate) fn handle_lines<'a>(&self, lines: impl Iterator<Item = &'a [u8]>, peer_pid: Option<u32>) {
        let mut events = Vec::new();
        for line in lines {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match parse_line(line) {
                Ok(event) => match self.check_peer(&event, peer_pid) {
                    Ok(()) => events.push(event),
                    Err(r) => self.reject(&r),
                },
                Err(r) => self.reject(&r),
            }
        }
        if events.is_empty() {
            return;
        }
        let mut rows: Vec<Row> = Vec::new();
        let mut rejections = Vec::new();
        // Accepted messages by type, counted once per read after the lock is
        // released rather than once per message under it.
        let mut accepted = [0u64; Event::KINDS.len()];
        {
            let now = unix_now();
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            for event in events {
                let kind = event.kind();
                match state.apply(event, now, peer_pid, &mut rows) {
                    Ok(()) => {
                        if let Some(i) = Event::KINDS.iter().position(|k| *k == kind) {
                            accepted[i] += 1;
                        }
                    }
                    Err(r) => rejections.push(r),
                }
            }
        }
        for (kind, n) in Event::KINDS.into_iter().zip(accepted).filter(|(_, n)| *n > 0) {
            self.metrics.messages.with_label_values(&[kind]).inc_by(n);
        }
        for r in &rejections {
            self.reject(r);
        }
        // The calls whose `llm_usage` row the full queue dropped, by row id:
        // their exemplars would name rows that never reach the file.
        let mut dropped: Vec<(String, String, i64)> = Vec::new();
        for row in rows {
            if let Some(Row::LlmUsage { id: Some(id), channel, model, .. }) = self.sink.send(row) {
                dropped.push((channel, model, id));
            }
        }
        if !dropped.is_empty() {
            self.state.lock().unwrap_or_else(|e| e.into_inner()).forget_exemplars(dropped);
        }
    }

    /// Compares the message's pid with the sending process, when the kernel
    /// names it (a peer in another pid namespace reads as 0 and is skipped).
    fn check_peer(&self, event: &Event, peer_pid: Option<u32>) -> std::result::Result<(), Rejection> {
        if self.config.verify_pid == VerifyPid::Off {
            return Ok(());
        }
        let (Some(peer), Some(pid)) = (peer_pid, event.pid()) else { return Ok(()) };
        if peer == pid {
            return Ok(());
        }
        self.metrics.peer_pid_mismatches.inc();
        let detail = format!("channel {:?} claims pid {pid} but the sender is pid {peer}", event.channel());
        if self.config.verify_pid == VerifyPid::Enforce {
            return Err(Rejection::new(Reason::PeerPidMismatch, detail));
        }
        if let Some(suppressed) = self.bad_input_log.allow() {
            warn!(reason = "peer_pid_mismatch", detail = %detail, suppressed, "message pid is not the sender's pid");
        }
        Ok(())
    }

    /// Counts a rejected line and logs it, rate-limited.
    pub(crate) fn reject(&self, r: &Rejection) {
        self.metrics.rejected.with_label_values(&[r.reason.as_str()]).inc();
        if let Some(suppressed) = self.bad_input_log.allow() {
            warn!(reason = %r.reason, detail = %r.detail, suppressed, "rejected a line from a bot");
        }
    }
}

/// Owns the socket file and its lock; removes the socket when dropped, but
/// only if the path still holds the very socket this process created, and
/// then the lock file.
#[derive(Debug)]
pub(crate) struct SocketGuard {
    path: PathBuf,
    inode: u64,
    removed: AtomicBool,
    // Dropped after `Drop::drop` has removed the socket.
    _lock: Option<LockFile>,
}

impl SocketGuard {
    /// The socket path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Unlinks the socket file so no new client can connect. Idempotent.
    pub(crate) fn remove(&self) {
        if self.removed.swap(true, Ordering::SeqCst) {
            return;
        }
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.file_type().is_socket() && m.ino() == self.inode => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!(path = %self.path.display(), error = %e, "could not remove the socket file");
                }
            }
            _ => debug!(path = %self.path.display(), "socket file already gone or replaced; left alone"),
        }
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Binds the Unix socket. A lock file next to it (`<path>.lock`, see
/// [`crate::lockfile`]) makes a second exporter fail fast instead of
/// stealing the socket; a leftover socket from a crashed run is replaced; a
/// socket that answers without the lock held (the legacy Python monitor) is
/// left alone with an error that says so; a path that is not a socket is
/// never removed. The mode applies from the first instant (umask around
/// `bind`, not `chmod` after), so there is no window with wider permissions.
/// On any failure the lock file is removed again: a failed start leaves
/// nothing behind.
pub(crate) fn bind(path: &Path, mode: u32, group: Option<u32>) -> Result<(UnixListener, SocketGuard)> {
    let bind_err = |source| Error::SocketBind { path: path.to_owned(), source };
    let answers = || std::os::unix::net::UnixStream::connect(path).is_ok();
    let lock = match LockFile::acquire("socket", path)? {
        Acquired::Held(lock) => Some(lock),
        Acquired::Unreadable(e) => {
            if answers() {
                return Err(Error::InUse { what: "socket", path: path.to_owned(), lock: lock_path(path) });
            }
            warn_unreadable("socket", path, &e);
            None
        }
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // We hold the lock, yet a socket answers: a monitor that does not
            // use the lock (the legacy Python one) is running there.
            if answers() {
                return Err(Error::ForeignListener { path: path.to_owned() });
            }
            info!(path = %path.display(), "replacing a stale socket from an earlier run");
            std::fs::remove_file(path).map_err(|source| Error::StaleSocket { path: path.to_owned(), source })?;
        }
        Ok(_) => return Err(Error::NotASocket { path: path.to_owned() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    // SAFETY: umask only swaps the process file-creation mask. It is process
    // wide, so this runs during start-up before any other file is created.
    let old = unsafe { libc::umask((!mode & 0o777) as libc::mode_t) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    let std_listener = bound.map_err(bind_err)?;
    let inode = std::fs::symlink_metadata(path).map_err(bind_err)?.ino();
    // From here on the guard removes the socket if a later step fails.
    let guard = SocketGuard { path: path.to_owned(), inode, removed: AtomicBool::new(false), _lock: lock };
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    if let Some(gid) = group {
        // The mode was already restrictive at creation, so handing the file
        // to a group only ever widens access to that group.
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(bind_err)?;
    }
    let listener = UnixListener::from_std(std_listener).map_err(bind_err)?;
    Ok((listener, guard))
}

/// Accepts connections until `shutdown` fires, then removes the socket file,
/// drains connections already waiting in the backlog, and waits for every
/// handler to finish its buffered lines.
pub(crate) async fn serve(
    listener: UnixListener,
    guard: SocketGuard,
    ingest: Arc<Ingest>,
    shutdown: CancellationToken,
    listening: Arc<AtomicBool>,
) {
    let tracker = TaskTracker::new();
    let slots = Arc::new(Slots::new(ingest.config.max_connections));
    let limit_log = RateLimitedLog::new(Duration::from_secs(10));
    listening.store(true, Ordering::SeqCst);
    info!(path = %guard.path().display(), "socket listening");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => admit(stream, &ingest, &slots, &tracker, &shutdown, &limit_log),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    // No new client can connect once the path is gone; those already queued
    // in the backlog have written their line and are drained below.
    guard.remove();
    listening.store(false, Ordering::SeqCst);
    while let Ok(Ok((stream, _))) = tokio::time::timeout(Duration::ZERO, listener.accept()).await {
        admit(stream, &ingest, &slots, &tracker, &shutdown, &limit_log);
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    debug!("ingest stopped");
}

fn admit(
    stream: UnixStream,
    ingest: &Arc<Ingest>,
    slots: &Arc<Slots>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    limit_log: &RateLimitedLog,
) {
    let cred = stream.peer_cred().ok();
    if !ingest.config.allowed_uids.is_empty() && !cred.is_some_and(|c| ingest.config.allowed_uids.contains(&c.uid())) {
        ingest.metrics.connections_rejected.with_label_values(&["uid"]).inc();
        if let Some(suppressed) = limit_log.allow() {
            warn!(uid = cred.map(|c| c.uid()), suppressed, "connection from a uid not in --socket.allowed-uids closed");
        }
        return;
    }
    // The kernel's word on who is sending. It reports 0 for a peer in a pid
    // namespace the exporter cannot see: that is no answer at all.
    let peer_pid = cred.and_then(|c| c.pid()).and_then(|p| u32::try_from(p).ok()).filter(|p| *p > 0);
    // Whatever the connection has sent already is read now, before a slot
    // is chosen: a bot writes its whole line right after connecting, so
    // this tells it from a flood of connections that have sent no line,
    // which could otherwise evict it before its task first runs.
    let mut framer = Framer::new(ingest.config.max_line_bytes);
    let early = read_waiting(&stream, &mut framer);
    let has_line = early > 0 && memchr::memchr(b'\n', framer.buffer()).is_some();
    let (slot, evicted) = slots.admit(has_line);
    if evicted {
        ingest.metrics.connections_evicted.with_label_values(&["limit"]).inc();
        if let Some(suppressed) = limit_log.allow() {
            warn!(
                limit = ingest.config.max_connections,
                suppressed,
                "connection limit reached; closed the connection that went longest without completing a line"
            );
        }
    }
    ingest.metrics.connections.inc();
    ingest.metrics.connections_active.inc();
    let ingest = ingest.clone();
    let shutdown = shutdown.clone();
    tracker.spawn(async move {
        handle(stream, &ingest, shutdown, peer_pid, &slot, framer, early).await;
        ingest.metrics.connections_active.dec();
        slot.release();
    });
}

/// Reads one connection until EOF, idle timeout, error, or the end of the
/// shutdown grace period.
async fn handle(
    mut stream: UnixStream,
    ingest: &Ingest,
    shutdown: CancellationToken,
    peer_pid: Option<u32>,
    slot: &Slot,
    mut framer: Framer,
    mut early: usize,
) {
    let max = ingest.config.max_line_bytes;
    let mut deadline: Option<Instant> = None;
    // When the first byte of the line not yet finished arrived.
    let mut line_started: Option<Instant> = None;
    loop {
        let n = if early > 0 {
            // What the accept loop already read for this connection.
            std::mem::take(&mut early)
        } else {
            // A line must finish within the line timeout of its first byte,
            // however slowly its bytes trickle in; otherwise the idle timeout.
            let wait_until = match line_started {
                Some(t) => (t + ingest.config.line_timeout).min(Instant::now() + ingest.config.idle_timeout),
                None => Instant::now() + ingest.config.idle_timeout,
            };
            let buf = framer.buffer();
            let read = match deadline {
                Some(d) => tokio::time::timeout_at(d, stream.read_buf(buf)).await,
                None => tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        deadline = Some(Instant::now() + DRAIN_GRACE);
                        continue;
                    }
                    _ = slot.state.evicted.cancelled() => {
                        debug!("connection evicted to make room for a new one");
                        break;
                    }
                    r = tokio::time::timeout_at(wait_until, stream.read_buf(buf)) => r,
                },
            };
            match read {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    debug!(error = %e, "connection read failed");
                    break;
                }
                Err(_) => {
                    if deadline.is_none() && line_started.is_some() {
                        ingest.metrics.connections_evicted.with_label_values(&["line_timeout"]).inc();
                        if let Some(suppressed) = ingest.bad_input_log.allow() {
                            warn!(
                                reason = "line_timeout",
                                timeout = ?ingest.config.line_timeout,
                                suppressed,
                                "closed a connection whose line did not finish in time"
                            );
                        }
                    } else {
                        debug!(grace = deadline.is_some(), "connection closed after timeout");
                    }
                    break;
                }
            }
        };
        if n == 0 {
            if let Some(last) = framer.finish() {
                ingest.handle_lines(std::iter::once(last), peer_pid);
            }
            return;
        }
        let frames = framer.scan(n);
        let completed = !frames.lines.is_empty();
        if completed {
            slot.completed_line();
        } else {
            slot.read_no_line();
        }
        ingest.handle_lines(frames.lines.iter().copied(), peer_pid);
        for _ in 0..frames.too_long {
            ingest.reject(&Rejection::new(
                Reason::LineTooLong,
                format!("line longer than {max} bytes; skipped up to the next newline"),
            ));
        }
        line_started = match (framer.mid_line(), line_started) {
            (false, _) => None,
            // A line that finished in this read and another that began in
            // it: the new line's clock starts now.
            (true, Some(_)) if completed => Some(Instant::now()),
            (true, Some(t)) => Some(t),
            (true, None) => Some(Instant::now()),
        };
    }
}

/// Reads, without waiting, what a new connection has already sent into the
/// framer's buffer; returns how many bytes (0 for none, for end of stream,
/// or on an error, all of which the connection's task finds out itself).
fn read_waiting(stream: &UnixStream, framer: &mut Framer) -> usize {
    let buf = framer.buffer();
    let spare = buf.spare_capacity_mut();
    // SAFETY: recv(2) writes at most `spare.len()` bytes into the vector's
    // spare capacity, which this function borrows mutably; MSG_DONTWAIT
    // makes it return at once. Tokio's own readiness tracking is untouched:
    // a later read that finds nothing simply waits for the next event.
    let n = unsafe { libc::recv(stream.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), libc::MSG_DONTWAIT) };
    let Ok(n) = usize::try_from(n) else { return 0 };
    // SAFETY: recv initialised exactly `n` bytes after the current length.
    unsafe { buf.set_len(buf.len() + n) };
    n
}

/// The connection slots: at most `max` connections are served at once, and
/// at the limit a new connection takes the slot of the connection that has
/// gone longest without completing a line. Bots connect and write their line
/// at once (or keep a connection and write every 30 s), so they always rank
/// above a sender that trickles bytes or sits idle after connecting; a flood
/// of such senders can therefore never lock bots out.
pub(crate) struct Slots {
    max: usize,
    start: Instant,
    next_id: std::sync::atomic::AtomicU64,
    open: Mutex<std::collections::HashMap<u64, Arc<SlotState>>>,
}

/// What the registry knows of one connection.
pub(crate) struct SlotState {
    /// Fired when the registry takes this slot for a newer connection.
    evicted: CancellationToken,
    /// The eviction rank ([`SlotState::rank`]): milliseconds since
    /// [`Slots::start`] of the last completed line; for a connection that
    /// has completed none, its arrival minus [`NEVER_COMPLETED_BIAS`], once
    /// more if it has sent bytes without a line.
    last_line_ms: std::sync::atomic::AtomicI64,
}

impl SlotState {
    /// Lower ranks are evicted first: connections that sent bytes but never
    /// a whole line, then connections that sent nothing yet (oldest first
    /// within each), then connections that completed lines (least recent
    /// line first).
    fn rank(&self) -> i64 {
        self.last_line_ms.load(Ordering::Relaxed)
    }
}

/// A connection's hold on its slot.
pub(crate) struct Slot {
    id: u64,
    slots: Arc<Slots>,
    state: Arc<SlotState>,
}

impl Slots {
    /// Room for `max` connections (at least one).
    pub(crate) fn new(max: usize) -> Slots {
        Slots {
            max: max.max(1),
            start: Instant::now(),
            next_id: std::sync::atomic::AtomicU64::new(0),
            open: Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn now_ms(&self) -> i64 {
        i64::try_from(self.start.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    /// A slot for a new connection, and whether another connection had to
    /// be evicted for it. The scan for the victim runs only at the limit.
    /// `has_line`: the connection has already sent a whole line.
    pub(crate) fn admit(self: &Arc<Self>, has_line: bool) -> (Slot, bool) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Never-completed connections rank by arrival, below every completed
        // line: arrival time minus a bias larger than any uptime in ms.
        let state = Arc::new(SlotState {
            evicted: CancellationToken::new(),
            last_line_ms: std::sync::atomic::AtomicI64::new(if has_line {
                self.now_ms()
            } else {
                self.now_ms() - NEVER_COMPLETED_BIAS
            }),
        });
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mut evicted = false;
        if open.len() >= self.max {
            if let Some((&victim, _)) = open.iter().min_by_key(|(_, s)| s.rank()) {
                if let Some(v) = open.remove(&victim) {
                    v.evicted.cancel();
                    evicted = true;
                }
            }
        }
        open.insert(id, state.clone());
        drop(open);
        let slot = Slot { id, slots: self.clone(), state };
        (slot, evicted)
    }
}

/// Subtracted from the arrival time of a connection that has not completed a
/// line yet, so that it ranks below every connection that has (about 31,700
/// years of milliseconds).
const NEVER_COMPLETED_BIAS: i64 = 1 << 50;

impl Slot {
    /// Records that the connection completed at least one line just now.
    fn completed_line(&self) {
        self.state.last_line_ms.store(self.slots.now_ms(), Ordering::Relaxed);
    }

    /// Records that bytes arrived without completing a line. A connection
    /// that has never completed one then ranks below even a connection whose
    /// bytes have not been read yet: a bot writes its whole line at once, so
    /// under a flood of new connections it is not the bot that goes.
    fn read_no_line(&self) {
        let rank = self.state.last_line_ms.load(Ordering::Relaxed);
        if (-NEVER_COMPLETED_BIAS..0).contains(&rank) {
            self.state.last_line_ms.store(rank - NEVER_COMPLETED_BIAS, Ordering::Relaxed);
        }
    }

    /// Gives the slot back (a no-op if it was already taken by eviction).
    fn release(&self) {
        self.slots.open.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}
