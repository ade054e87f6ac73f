//! A fire-and-forget client for bots written in Rust: it speaks the same
//! protocol as the stock Python client, so a bot can use it against this
//! exporter or the legacy monitor alike.
//!
//! The client never panics and never blocks longer than its timeout (2 s by
//! default, connect and write together). Every method reports whether the
//! line was *delivered to the socket*; a bot is expected to ignore the answer
//! and carry on, exactly as with the stock client. It keeps one connection
//! open and reconnects on the next send after any error, so an exporter that
//! restarts is picked up again without the bot doing anything.
//!
//! It uses only the standard library plus `serde_json` (to escape strings
//! correctly) and `libc` (a connect that honours the timeout, and writes
//! that never raise `SIGPIPE`), both of which the crate already depends on.
//!
//! ```no_run
//! use std::time::Duration;
//! use kissbot_exporter::client::{LlmCall, MonitorClient};
//!
//! let client = MonitorClient::new("el_serda", std::process::id());
//! client.register(&[("llm", true), ("translator", false)]);
//! client.start_heartbeat(Duration::from_secs(30));
//!
//! // ... after each LLM call:
//! client.log_llm_usage(&LlmCall::new("gpt-4o-mini", "jokes", 145, 87).latency_ms(1850.0));
//!
//! // On a clean shutdown:
//! client.stop_heartbeat();
//! client.unregister();
//! ```

pub mod cli;

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::ser::{SerializeMap, Serializer};

use crate::event::{parse_line, MAX_LABEL_BYTES};

/// The socket path bots and the exporter use unless told otherwise.
pub const DEFAULT_SOCKET_PATH: &str = "/tmp/kissbot_monitor.sock";

/// How long one send may take, connect and write together, by default. The
/// stock Python client uses the same 2 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest channel name the exporter accepts, in bytes.
pub const MAX_CHANNEL_BYTES: usize = MAX_LABEL_BYTES;

/// The shortest heartbeat interval [`MonitorClient::start_heartbeat`] uses;
/// shorter ones are raised to it.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(10);

/// One LLM call, as reported with [`MonitorClient::log_llm_usage`].
///
/// ```
/// use kissbot_exporter::client::LlmCall;
///
/// let call = LlmCall::new("gpt-4o", "translate", 1200, 300).latency_ms(840.5).cost_usd(0.006);
/// assert_eq!(call.tokens_in, 1200);
/// assert_eq!(call.cost_usd, Some(0.006));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LlmCall<'a> {
    /// The model name, e.g. `gpt-4o-mini`. Names longer than 128 bytes are
    /// cut by the exporter.
    pub model: &'a str,
    /// The bot feature that made the call, e.g. `jokes`.
    pub feature: &'a str,
    /// Prompt tokens.
    pub tokens_in: u64,
    /// Completion tokens.
    pub tokens_out: u64,
    /// How long the call took, in milliseconds, if measured.
    pub latency_ms: Option<f64>,
    /// What the call cost in USD, if the bot knows; otherwise the exporter
    /// prices it from its table.
    pub cost_usd: Option<f64>,
    /// The provider serving the model (e.g. `openai`), if the bot knows.
    pub provider: Option<&'a str>,
    /// Prompt tokens served from the provider's cache (part of `tokens_in`).
    pub tokens_cached: Option<u64>,
    /// True when the call failed; it is then counted as an error.
    pub failed: bool,
}

impl<'a> LlmCall<'a> {
    /// A call with no latency and no cost.
    ///
    /// ```
    /// use kissbot_exporter::client::LlmCall;
    ///
    /// let call = LlmCall::new("gpt-4", "jokes", 145, 87);
    /// assert_eq!((call.latency_ms, call.cost_usd), (None, None));
    /// ```
    pub fn new(model: &'a str, feature: &'a str, tokens_in: u64, tokens_out: u64) -> LlmCall<'a> {
        LlmCall {
            model,
            feature,
            tokens_in,
            tokens_out,
            latency_ms: None,
            cost_usd: None,
            provider: None,
            tokens_cached: None,
            failed: false,
        }
    }

    /// Sets the latency in milliseconds.
    ///
    /// ```
    /// use kissbot_exporter::client::LlmCall;
    ///
    /// assert_eq!(LlmCall::new("m", "f", 1, 1).latency_ms(12.5).latency_ms, Some(12.5));
    /// ```
    pub fn latency_ms(mut self, ms: f64) -> LlmCall<'a> {
        self.latency_ms = Some(ms);
        self
    }

    /// Sets the cost in USD.
    ///
    /// ```
    /// use kissbot_exporter::client::LlmCall;
    ///
    /// assert_eq!(LlmCall::new("m", "f", 1, 1).cost_usd(0.25).cost_usd, Some(0.25));
    /// ```
    pub fn cost_usd(mut self, usd: f64) -> LlmCall<'a> {
        self.cost_usd = Some(usd);
        self
    }

    /// Sets the provider.
    ///
    /// ```
    /// use kissbot_exporter::client::LlmCall;
    ///
    /// assert_eq!(LlmCall::new("m", "f", 1, 1).provider("openai").provider, Some("openai"));
    /// ```
    pub fn provider(mut self, provider: &'a str) -> LlmCall<'a> {
        self.provider = Some(provider);
        self
    }

    /// Sets how many of the prompt tokens came from the provider's cache.
    ///
    /// ```
    /// use kissbot_exporter::client::LlmCall;
    ///
    /// assert_eq!(LlmCall::new("m", "f", 100, 1).tokens_cached(60).tokens_cached, Some(60));
    /// ```
    pub fn tokens_cached(mut self, tokens: u64) -> LlmCall<'a> {
        self.tokens_cached = Some(tokens);
        self
    }

    /// Marks the call as failed (sent as `"status": "error"`).
    ///
    /// ```
    /// use kissbot_exporter::client::LlmCall;
    ///
    /// assert!(LlmCall::new("m", "f", 100, 0).failed().failed);
    /// ```
    pub fn failed(mut self) -> LlmCall<'a> {
        self.failed = true;
        self
    }
}

/// One message of the protocol, for [`MonitorClient::send`]. The channel and
/// pid come from the client.
///
/// ```no_run
/// use kissbot_exporter::client::{Message, MonitorClient};
///
/// let client = MonitorClient::new("el_serda", 12345);
/// if let Err(e) = client.send(&Message::Heartbeat) {
///     eprintln!("monitor not reachable: {e}");
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Message<'a> {
    /// The bot started, with its named features and whether each is on.
    Register {
        /// Feature names and flags, written in this order.
        features: &'a [(&'a str, bool)],
    },
    /// The bot is alive.
    Heartbeat,
    /// The bot is shutting down cleanly.
    Unregister,
    /// The bot made one LLM call.
    LlmUsage(LlmCall<'a>),
}

impl Message<'_> {
    /// The `type` field on the wire.
    ///
    /// ```
    /// use kissbot_exporter::client::Message;
    ///
    /// assert_eq!(Message::Heartbeat.kind(), "heartbeat");
    /// ```
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Register { .. } => "register",
            Message::Heartbeat => "heartbeat",
            Message::Unregister => "unregister",
            Message::LlmUsage(_) => "llm_usage",
        }
    }
}

/// A connection to the exporter (or the legacy monitor) for one bot.
///
/// Cheap to create; nothing is opened until the first send. All methods take
/// `&self`, so one client can be shared between threads (wrap it in an
/// [`Arc`]); sends from several threads at once never wait for each other: a
/// send that finds the shared connection busy uses a connection of its own.
///
/// ```no_run
/// use std::time::Duration;
/// use kissbot_exporter::client::MonitorClient;
///
/// let client = MonitorClient::new("el_serda", std::process::id())
///     .socket_path("/run/kissbot/monitor.sock")
///     .timeout(Duration::from_millis(500));
/// let delivered = client.heartbeat();
/// # let _ = delivered;
/// ```
pub struct MonitorClient {
    shared: Arc<Shared>,
    heartbeat: Mutex<Option<HeartbeatThread>>,
}

struct Shared {
    channel: String,
    pid: Option<u32>,
    /// Where and how long: held only to copy or change them, never during I/O.
    settings: Mutex<Settings>,
    /// The kept connection: held for the whole of one send.
    conn: Mutex<Option<UnixStream>>,
}

#[derive(Clone)]
struct Settings {
    path: PathBuf,
    timeout: Duration,
}

struct HeartbeatThread {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl fmt::Debug for MonitorClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings = self.shared.settings();
        f.debug_struct("MonitorClient")
            .field("channel", &self.shared.channel)
            .field("pid", &self.shared.pid)
            .field("socket_path", &settings.path)
            .field("timeout", &settings.timeout)
            .field("heartbeat", &lock(&self.heartbeat).is_some())
            .finish()
    }
}

impl MonitorClient {
    /// A client for the bot on `channel` running as process `pid` (usually
    /// [`std::process::id`]), writing to [`DEFAULT_SOCKET_PATH`] with
    /// [`DEFAULT_TIMEOUT`].
    ///
    /// ```
    /// use kissbot_exporter::client::MonitorClient;
    ///
    /// let client = MonitorClient::new("el_serda", std::process::id());
    /// assert_eq!(client.channel(), "el_serda");
    /// ```
    pub fn new(channel: impl Into<String>, pid: u32) -> MonitorClient {
        MonitorClient::build(channel.into(), Some(pid))
    }

    /// A client that only reports LLM usage and sends no pid, like the bots'
    /// background usage logger. Its register, heartbeat and unregister
    /// return `false` without sending anything: the exporter needs a pid
    /// for those.
    ///
    /// ```
    /// use kissbot_exporter::client::MonitorClient;
    ///
    /// let client = MonitorClient::usage_only("44456636");
    /// assert_eq!(client.pid(), None);
    /// assert!(!client.heartbeat());
    /// ```
    pub fn usage_only(channel: impl Into<String>) -> MonitorClient {
        MonitorClient::build(channel.into(), None)
    }

    fn build(channel: String, pid: Option<u32>) -> MonitorClient {
        MonitorClient {
            shared: Arc::new(Shared {
                channel,
                pid,
                settings: Mutex::new(Settings { path: DEFAULT_SOCKET_PATH.into(), timeout: DEFAULT_TIMEOUT }),
                conn: Mutex::new(None),
            }),
            heartbeat: Mutex::new(None),
        }
    }

    /// Writes to another socket path. Closes the current connection, if any.
    ///
    /// ```
    /// use kissbot_exporter::client::MonitorClient;
    ///
    /// let client = MonitorClient::new("el_serda", 12345).socket_path("/run/kissbot/monitor.sock");
    /// assert_eq!(client.path(), std::path::Path::new("/run/kissbot/monitor.sock"));
    /// ```
    pub fn socket_path(self, path: impl Into<PathBuf>) -> MonitorClient {
        lock(&self.shared.settings).path = path.into();
        *lock(&self.shared.conn) = None;
        self
    }

    /// Sets how long one send may take, connect and write together. A zero
    /// timeout makes every send fail.
    ///
    /// ```
    /// use std::time::Duration;
    /// use kissbot_exporter::client::MonitorClient;
    ///
    /// let client = MonitorClient::new("el_serda", 12345).timeout(Duration::from_millis(250));
    /// assert_eq!(client.current_timeout(), Duration::from_millis(250));
    /// ```
    pub fn timeout(self, timeout: Duration) -> MonitorClient {
        lock(&self.shared.settings).timeout = timeout;
        self
    }

    /// The bot's channel.
    ///
    /// ```
    /// # use kissbot_exporter::client::MonitorClient;
    /// assert_eq!(MonitorClient::new("a", 1).channel(), "a");
    /// ```
    pub fn channel(&self) -> &str {
        &self.shared.channel
    }

    /// The bot's pid, if the client has one.
    ///
    /// ```
    /// # use kissbot_exporter::client::MonitorClient;
    /// assert_eq!(MonitorClient::new("a", 7).pid(), Some(7));
    /// ```
    pub fn pid(&self) -> Option<u32> {
        self.shared.pid
    }

    /// The socket path the client writes to.
    ///
    /// ```
    /// # use kissbot_exporter::client::{MonitorClient, DEFAULT_SOCKET_PATH};
    /// assert_eq!(MonitorClient::new("a", 1).path(), std::path::Path::new(DEFAULT_SOCKET_PATH));
    /// ```
    pub fn path(&self) -> PathBuf {
        self.shared.settings().path
    }

    /// The timeout of one send.
    ///
    /// ```
    /// # use kissbot_exporter::client::{MonitorClient, DEFAULT_TIMEOUT};
    /// assert_eq!(MonitorClient::new("a", 1).current_timeout(), DEFAULT_TIMEOUT);
    /// ```
    pub fn current_timeout(&self) -> Duration {
        self.shared.settings().timeout
    }

    /// Announces that the bot started, with its features. Returns whether
    /// the line was delivered to the socket.
    ///
    /// ```no_run
    /// # use kissbot_exporter::client::MonitorClient;
    /// let client = MonitorClient::new("el_serda", std::process::id());
    /// client.register(&[("llm", true), ("translator", false)]);
    /// ```
    pub fn register(&self, features: &[(&str, bool)]) -> bool {
        self.send(&Message::Register { features }).is_ok()
    }

    /// Says the bot is alive. Returns whether the line was delivered.
    ///
    /// ```no_run
    /// # use kissbot_exporter::client::MonitorClient;
    /// let client = MonitorClient::new("el_serda", std::process::id());
    /// client.heartbeat();
    /// ```
    pub fn heartbeat(&self) -> bool {
        self.send(&Message::Heartbeat).is_ok()
    }

    /// Says the bot is shutting down cleanly. Returns whether the line was
    /// delivered.
    ///
    /// ```no_run
    /// # use kissbot_exporter::client::MonitorClient;
    /// let client = MonitorClient::new("el_serda", std::process::id());
    /// client.unregister();
    /// ```
    pub fn unregister(&self) -> bool {
        self.send(&Message::Unregister).is_ok()
    }

    /// Reports one LLM call. Returns whether the line was delivered.
    ///
    /// ```no_run
    /// # use kissbot_exporter::client::{LlmCall, MonitorClient};
    /// let client = MonitorClient::new("el_serda", std::process::id());
    /// client.log_llm_usage(&LlmCall::new("gpt-4", "jokes", 145, 87).latency_ms(1850.0));
    /// ```
    pub fn log_llm_usage(&self, call: &LlmCall<'_>) -> bool {
        self.send(&Message::LlmUsage(*call)).is_ok()
    }

    /// Sends one message and says why it was not delivered, for callers
    /// that want to log it. A message the exporter would reject (an empty
    /// or over-long channel, a negative or absurd number) is not sent and
    /// fails with [`io::ErrorKind::InvalidInput`].
    ///
    /// ```no_run
    /// # use kissbot_exporter::client::{Message, MonitorClient};
    /// let client = MonitorClient::new("el_serda", std::process::id());
    /// match client.send(&Message::Heartbeat) {
    ///     Ok(()) => {}
    ///     Err(e) => eprintln!("monitor not reachable: {e}"),
    /// }
    /// ```
    pub fn send(&self, message: &Message<'_>) -> io::Result<()> {
        let line = self.shared.encode(message)?;
        self.shared.deliver(line.as_bytes())
    }

    /// The exact line (with its trailing newline) that [`send`](Self::send)
    /// writes for `message`, or why it would not be sent.
    ///
    /// ```
    /// use kissbot_exporter::client::{Message, MonitorClient};
    ///
    /// let client = MonitorClient::new("el_serda", 12345);
    /// assert_eq!(
    ///     client.line(&Message::Heartbeat).unwrap(),
    ///     "{\"type\": \"heartbeat\", \"channel\": \"el_serda\", \"pid\": 12345}\n"
    /// );
    /// ```
    pub fn line(&self, message: &Message<'_>) -> io::Result<String> {
        self.shared.encode(message)
    }

    /// Starts a background thread that sends a heartbeat every `interval`
    /// (the first one after one interval; the stock client uses 30 s).
    /// Replaces a heartbeat thread already running. Returns whether the
    /// thread could be started. Intervals under [`MIN_HEARTBEAT_INTERVAL`]
    /// are raised to it.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use kissbot_exporter::client::MonitorClient;
    /// let client = MonitorClient::new("el_serda", std::process::id());
    /// client.register(&[]);
    /// client.start_heartbeat(Duration::from_secs(30));
    /// ```
    pub fn start_heartbeat(&self, interval: Duration) -> bool {
        self.stop_heartbeat();
        let interval = interval.max(MIN_HEARTBEAT_INTERVAL);
        let (stop, stopped) = mpsc::channel::<()>();
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new().name("kissbot-heartbeat".into()).spawn(move || loop {
            match stopped.recv_timeout(interval) {
                Err(RecvTimeoutError::Timeout) => {
                    let _ = shared.encode(&Message::Heartbeat).and_then(|l| shared.deliver(l.as_bytes()));
                }
                // A message or a dropped sender both mean stop.
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
        });
        match spawned {
            Ok(thread) => {
                *lock(&self.heartbeat) = Some(HeartbeatThread { stop, thread });
                true
            }
            Err(_) => false,
        }
    }

    /// Stops the heartbeat thread, if one runs, and waits for it: at once,
    /// or after the heartbeat it is sending (at most the timeout). Dropping
    /// the client does the same.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use kissbot_exporter::client::MonitorClient;
    /// let client = MonitorClient::new("el_serda", std::process::id());
    /// client.start_heartbeat(Duration::from_secs(30));
    /// client.stop_heartbeat();
    /// client.unregister();
    /// ```
    pub fn stop_heartbeat(&self) {
        let running = lock(&self.heartbeat).take();
        if let Some(HeartbeatThread { stop, thread }) = running {
            drop(stop);
            // The thread catches nothing that could panic; a join error
            // would only mean it is gone already.
            let _ = thread.join();
        }
    }

    /// Whether a heartbeat thread is running.
    ///
    /// ```
    /// # use kissbot_exporter::client::MonitorClient;
    /// assert!(!MonitorClient::new("a", 1).heartbeat_running());
    /// ```
    pub fn heartbeat_running(&self) -> bool {
        lock(&self.heartbeat).as_ref().is_some_and(|h| !h.thread.is_finished())
    }
}

impl Drop for MonitorClient {
    fn drop(&mut self) {
        self.stop_heartbeat();
    }
}

impl Shared {
    /// Builds the line the stock client would write, then checks it with the
    /// exporter's own parser so that what the exporter would reject is
    /// refused here, with the same reason.
    fn encode(&self, message: &Message<'_>) -> io::Result<String> {
        let pid = match (message, self.pid) {
            (Message::LlmUsage(_), pid) => pid,
            (_, Some(pid)) => Some(pid),
            (_, None) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a {} needs a pid and this client has none", message.kind()),
                ))
            }
        };
        if let Message::LlmUsage(call) = message {
            // JSON has no NaN or infinity (serde_json would write null and
            // the value would vanish without a trace).
            for (name, value) in [("latency_ms", call.latency_ms), ("cost_usd", call.cost_usd)] {
                if value.is_some_and(|v| !v.is_finite()) {
                    return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is not a finite number")));
                }
            }
        }
        let mut buf = Vec::with_capacity(160);
        write_line(&mut buf, &self.channel, pid, message)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("cannot encode the message: {e}")))?;
        if let Err(r) = parse_line(&buf) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the exporter would reject this {} ({}): {}", message.kind(), r.reason, r.detail),
            ));
        }
        buf.push(b'\n');
        // serde_json writes valid UTF-8 and the formatter only adds ASCII.
        String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    fn settings(&self) -> Settings {
        lock(&self.settings).clone()
    }

    /// Writes one line on the kept connection, reconnecting once if that
    /// connection has gone bad (exporter restarted, idle timeout). When the
    /// kept connection is busy with another thread's send, a connection of
    /// its own is used instead of waiting.
    fn deliver(&self, line: &[u8]) -> io::Result<()> {
        let Settings { path, timeout } = self.settings();
        let deadline = Instant::now() + timeout;
        let mut kept = match self.conn.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                let stream = connect(&path, deadline)?;
                return write_all(&stream, line, deadline);
            }
        };
        if let Some(stream) = kept.take() {
            if write_all(&stream, line, deadline).is_ok() {
                *kept = Some(stream);
                return Ok(());
            }
            // The peer is gone (EPIPE) or stalled: drop this connection and
            // try once on a fresh one within the same deadline. A line cut
            // by a timeout is rejected by the exporter as one bad line.
        }
        let stream = connect(&path, deadline)?;
        write_all(&stream, line, deadline)?;
        *kept = Some(stream);
        Ok(())
    }
}

/// Locks a mutex, ignoring poisoning: the data behind it stays valid (a
/// connection that may be closed, plain settings).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
    }
    Ok(left)
}

/// Connects to a Unix stream socket, giving up at `deadline`. `connect(2)`
/// on a Unix socket waits for room in a full listen backlog, bounded by the
/// socket's send timeout, which std's `UnixStream::connect` cannot set
/// beforehand.
fn connect(path: &Path, deadline: Instant) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path must be 1 to {} bytes without NUL", addr.sun_path.len() - 1),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    loop {
        stream.set_write_timeout(Some(remaining(deadline)?))?;
        // SAFETY: addr is a valid sockaddr_un and len does not exceed it.
        let r = unsafe {
            libc::connect(
                stream.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
                len as libc::socklen_t,
            )
        };
        if r == 0 {
            return Ok(stream);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out connecting (listen backlog full)"))
            }
            _ => return Err(e),
        }
    }
}

/// Writes all of `buf`, giving up at `deadline`, without ever raising
/// `SIGPIPE` when the exporter has gone away.
fn write_all(stream: &UnixStream, mut buf: &[u8], deadline: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        stream.set_write_timeout(Some(remaining(deadline)?))?;
        // SAFETY: buf is a live slice of buf.len() bytes.
        let n = unsafe { libc::send(stream.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out writing (exporter not reading)"))
                }
                _ => return Err(e),
            }
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// Writes the message the way the stock Python client does: `json.dumps`
/// of a dict with `type` first, `", "` and `": "` separators, non-ASCII
/// escaped as `\uXXXX`. Whole-number floats are written as integers, as the
/// stock client sends its latency.
fn write_line(buf: &mut Vec<u8>, channel: &str, pid: Option<u32>, message: &Message<'_>) -> serde_json::Result<()> {
    let mut ser = serde_json::Serializer::with_formatter(buf, PythonFormatter);
    let mut map = ser.serialize_map(None)?;
    map.serialize_entry("type", message.kind())?;
    map.serialize_entry("channel", channel)?;
    match message {
        Message::Register { features } => {
            map.serialize_entry("pid", &pid)?;
            map.serialize_entry("features", &OrderedFeatures(features))?;
        }
        Message::Heartbeat | Message::Unregister => map.serialize_entry("pid", &pid)?,
        Message::LlmUsage(call) => {
            map.serialize_entry("model", call.model)?;
            map.serialize_entry("feature", call.feature)?;
            map.serialize_entry("tokens_in", &call.tokens_in)?;
            map.serialize_entry("tokens_out", &call.tokens_out)?;
            if let Some(ms) = call.latency_ms {
                map.serialize_entry("latency_ms", &Number(ms))?;
            }
            if let Some(pid) = pid {
                map.serialize_entry("pid", &pid)?;
            }
            if let Some(usd) = call.cost_usd {
                map.serialize_entry("cost_usd", &Number(usd))?;
            }
            if let Some(provider) = call.provider {
                map.serialize_entry("provider", provider)?;
            }
            if let Some(cached) = call.tokens_cached {
                map.serialize_entry("tokens_cached", &cached)?;
            }
            if call.failed {
                map.serialize_entry("status", "error")?;
            }
        }
    }
    map.end()
}

/// Features as a JSON object in the caller's order (a map type would sort).
struct OrderedFeatures<'a>(&'a [(&'a str, bool)]);

impl serde::Serialize for OrderedFeatures<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, on) in self.0 {
            map.serialize_entry(name, on)?;
        }
        map.end()
    }
}

/// A float written as an integer when it is a whole number that fits.
struct Number(f64);

impl serde::Serialize for Number {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let x = self.0;
        if x.fract() == 0.0 && x.abs() < 9.0e15 {
            s.serialize_i64(x as i64)
        } else {
            s.serialize_f64(x)
        }
    }
}

/// `json.dumps` defaults: `", "` and `": "` separators, `ensure_ascii`.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_object_key<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(&mut self, w: &mut W, fragment: &str) -> io::Result<()> {
        // Quotes, backslashes and control characters never reach here;
        // serde_json escapes them itself, as Python does.
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if (' '..='~').contains(&c) {
                continue;
            }
            w.write_all(&fragment.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                write!(w, "\\u{unit:04x}")?;
            }
            start = i + c.len_utf8();
        }
        w.write_all(&fragment.as_bytes()[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stock Python client's exact lines.
    const REGISTER: &str =
        r#"{"type": "register", "channel": "el_serda", "pid": 12345, "features": {"llm": true, "translator": false}}"#;
    const HEARTBEAT: &str = r#"{"type": "heartbeat", "channel": "el_serda", "pid": 12345}"#;
    const LLM_USAGE: &str = r#"{"type": "llm_usage", "channel": "el_serda", "model": "gpt-4", "feature": "jokes", "tokens_in": 145, "tokens_out": 87, "latency_ms": 1850}"#;
    const UNREGISTER: &str = r#"{"type": "unregister", "channel": "el_serda", "pid": 12345}"#;
    const BACKGROUND: &str = r#"{"type": "llm_usage", "channel": "44456636", "model": "gpt-3.5-turbo", "feature": "gen_long", "tokens_in": 153, "tokens_out": 178}"#;

    fn line(c: &MonitorClient, m: Message<'_>) -> String {
        c.line(&m).unwrap().trim_end_matches('\n').to_owned()
    }

    #[test]
    fn lines_match_the_stock_client_byte_for_byte() {
        let c = MonitorClient::new("el_serda", 12345);
        assert_eq!(line(&c, Message::Register { features: &[("llm", true), ("translator", false)] }), REGISTER);
        assert_eq!(line(&c, Message::Heartbeat), HEARTBEAT);
        assert_eq!(line(&c, Message::Unregister), UNREGISTER);
        let u = MonitorClient::usage_only("el_serda");
        assert_eq!(line(&u, Message::LlmUsage(LlmCall::new("gpt-4", "jokes", 145, 87).latency_ms(1850.0))), LLM_USAGE);
        let bg = MonitorClient::usage_only("44456636");
        assert_eq!(line(&bg, Message::LlmUsage(LlmCall::new("gpt-3.5-turbo", "gen_long", 153, 178))), BACKGROUND);
        assert!(c.line(&Message::Heartbeat).unwrap().ends_with("}\n"));
    }

    #[test]
    fn optional_fields_follow_the_stock_ones() {
        let c = MonitorClient::new("a", 7);
        let call = LlmCall::new("m", "f", 1, 2).latency_ms(12.5).cost_usd(0.000_5);
        assert_eq!(
            line(&c, Message::LlmUsage(call)),
            r#"{"type": "llm_usage", "channel": "a", "model": "m", "feature": "f", "tokens_in": 1, "tokens_out": 2, "latency_ms": 12.5, "pid": 7, "cost_usd": 0.0005}"#
        );
        let call = LlmCall::new("m", "f", 10, 2).provider("openai").tokens_cached(4).failed();
        assert_eq!(
            line(&c, Message::LlmUsage(call)),
            r#"{"type": "llm_usage", "channel": "a", "model": "m", "feature": "f", "tokens_in": 10, "tokens_out": 2, "pid": 7, "provider": "openai", "tokens_cached": 4, "status": "error"}"#
        );
        assert_eq!(
            line(&c, Message::Register { features: &[] }),
            r#"{"type": "register", "channel": "a", "pid": 7, "features": {}}"#
        );
    }

    #[test]
    fn strings_are_escaped_like_python() {
        let c = MonitorClient::new("caf\u{e9} \"q\"\n\\ \u{1F600}\u{7f}", 1);
        assert_eq!(
            line(&c, Message::Heartbeat),
            r#"{"type": "heartbeat", "channel": "caf\u00e9 \"q\"\n\\ \ud83d\ude00\u007f", "pid": 1}"#
        );
        let parsed = parse_line(line(&c, Message::Heartbeat).as_bytes()).unwrap();
        assert_eq!(parsed.channel(), c.channel());
    }

    #[test]
    fn what_the_exporter_would_reject_is_not_sent() {
        let long = "x".repeat(MAX_CHANNEL_BYTES + 1);
        let err = MonitorClient::new(long, 1).line(&Message::Heartbeat).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("label_too_long"), "{err}");
        assert!(MonitorClient::new("", 1).line(&Message::Heartbeat).is_err());
        assert!(MonitorClient::new("a", 0).line(&Message::Heartbeat).is_err());
        let c = MonitorClient::new("a", 1);
        for call in [
            LlmCall::new("", "f", 1, 1),
            LlmCall::new("m", "f", 1, 1).latency_ms(-1.0),
            LlmCall::new("m", "f", 1, 1).cost_usd(f64::NAN),
            LlmCall::new("m", "f", u64::MAX, 1),
            LlmCall::new("m", "f", 1, 1).tokens_cached(2),
        ] {
            assert!(c.line(&Message::LlmUsage(call)).is_err(), "{call:?}");
        }
        let u = MonitorClient::usage_only("a");
        assert!(u.line(&Message::Heartbeat).is_err());
        assert!(!u.register(&[]));
    }

    #[test]
    fn no_listener_fails_fast_and_never_panics() {
        let dir = std::env::temp_dir().join(format!("kissbot-client-test-{}", std::process::id()));
        let c = MonitorClient::new("a", 1).socket_path(dir.join("absent.sock")).timeout(Duration::from_millis(300));
        let started = Instant::now();
        assert!(!c.heartbeat());
        assert!(c.send(&Message::Heartbeat).is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
        let c = c.socket_path("x".repeat(200));
        assert_eq!(c.send(&Message::Heartbeat).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        let c = c.timeout(Duration::ZERO);
        assert!(!c.heartbeat());
    }

    #[test]
    fn heartbeat_thread_stops_on_request_and_on_drop() {
        let c = MonitorClient::new("a", 1).socket_path("/nonexistent/kissbot.sock");
        assert!(c.start_heartbeat(Duration::from_millis(5)));
        assert!(c.heartbeat_running());
        std::thread::sleep(Duration::from_millis(30));
        let started = Instant::now();
        c.stop_heartbeat();
        assert!(!c.heartbeat_running());
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(c.start_heartbeat(Duration::from_secs(3600)));
        let started = Instant::now();
        drop(c);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
