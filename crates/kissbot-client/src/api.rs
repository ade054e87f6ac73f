//! The client itself: [`MonitorClient`], its kept connection, and the
//! heartbeat thread.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::transport::{connect, write_all};
use crate::wire::{self, LlmCall, Message};

/// The socket path bots and the exporter use unless told otherwise.
pub const DEFAULT_SOCKET_PATH: &str = "/tmp/kissbot_monitor.sock";

/// How long one send may take, connect and write together, by default. The
/// stock Python client uses the same 2 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// The shortest heartbeat interval [`MonitorClient::start_heartbeat`] uses;
/// shorter ones are raised to it.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(10);

/// A connection to the exporter (or the legacy monitor) for one bot.
///
/// Cheap to create; nothing is opened until the first send. All methods take
/// `&self`, so one client can be shared between threads (wrap it in an
/// [`Arc`]); sends from several threads at once never wait for each other: a
/// send that finds the shared connection busy uses a connection of its own.
///
/// ```no_run
/// use std::time::Duration;
/// use kissbot_client::MonitorClient;
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
    conn: Mutex<Option<Socket>>,
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
    /// use kissbot_client::MonitorClient;
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
    /// use kissbot_client::MonitorClient;
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
    /// use kissbot_client::MonitorClient;
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
    /// use kissbot_client::MonitorClient;
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
    /// # use kissbot_client::MonitorClient;
    /// assert_eq!(MonitorClient::new("a", 1).channel(), "a");
    /// ```
    pub fn channel(&self) -> &str {
        &self.shared.channel
    }

    /// The bot's pid, if the client has one.
    ///
    /// ```
    /// # use kissbot_client::MonitorClient;
    /// assert_eq!(MonitorClient::new("a", 7).pid(), Some(7));
    /// ```
    pub fn pid(&self) -> Option<u32> {
        self.shared.pid
    }

    /// The socket path the client writes to.
    ///
    /// ```
    /// # use kissbot_client::{MonitorClient, DEFAULT_SOCKET_PATH};
    /// assert_eq!(MonitorClient::new("a", 1).path(), std::path::Path::new(DEFAULT_SOCKET_PATH));
    /// ```
    pub fn path(&self) -> PathBuf {
        self.shared.settings().path
    }

    /// The timeout of one send.
    ///
    /// ```
    /// # use kissbot_client::{MonitorClient, DEFAULT_TIMEOUT};
    /// assert_eq!(MonitorClient::new("a", 1).current_timeout(), DEFAULT_TIMEOUT);
    /// ```
    pub fn current_timeout(&self) -> Duration {
        self.shared.settings().timeout
    }

    /// Announces that the bot started, with its features. Returns whether
    /// the line was delivered to the socket.
    ///
    /// ```no_run
    /// # use kissbot_client::MonitorClient;
    /// let client = MonitorClient::new("el_serda", std::process::id());
    /// client.register(&[("llm", true), ("translator", false)]);
    /// ```
    pub fn register(&self, features: &[(&str, bool)]) -> bool {
        self.send(&Message::Register { features }).is_ok()
    }

    /// Says the bot is alive. Returns whether the line was delivered.
    ///
    /// ```no_run
    /// # use kissbot_client::MonitorClient;
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
    /// # use kissbot_client::MonitorClient;
    /// let client = MonitorClient::new("el_serda", std::process::id());
    /// client.unregister();
    /// ```
    pub fn unregister(&self) -> bool {
        self.send(&Message::Unregister).is_ok()
    }

    /// Reports one LLM call. Returns whether the line was delivered.
    ///
    /// ```no_run
    /// # use kissbot_client::{LlmCall, MonitorClient};
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
    /// # use kissbot_client::{Message, MonitorClient};
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
    /// use kissbot_client::{Message, MonitorClient};
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
    /// # use kissbot_client::MonitorClient;
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
    /// # use kissbot_client::MonitorClient;
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
    /// # use kissbot_client::MonitorClient;
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
    /// The line for `message` from this bot: see [`wire::encode`].
    fn encode(&self, message: &Message<'_>) -> io::Result<String> {
        wire::encode(&self.channel, self.pid, message)
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
                let socket = connect(&path, deadline)?;
                return write_all(&socket, line, deadline);
            }
        };
        if let Some(socket) = kept.take() {
            if write_all(&socket, line, deadline).is_ok() {
                *kept = Some(socket);
                return Ok(());
            }
            // The peer is gone (EPIPE) or stalled: drop this connection and
            // try once on a fresh one within the same deadline. A line cut
            // by a timeout is rejected by the exporter as one bad line.
        }
        let socket = connect(&path, deadline)?;
        write_all(&socket, line, deadline)?;
        *kept = Some(socket);
        Ok(())
    }
}

/// Locks a mutex, ignoring poisoning: the data behind it stays valid (a
/// connection that may be closed, plain settings).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Reads from `peer` until `n` lines have arrived.
    fn read_lines(peer: &mut std::os::unix::net::UnixStream, n: usize) -> String {
        use std::io::Read;
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 512];
        while got.iter().filter(|b| **b == b'\n').count() < n {
            let read = peer.read(&mut chunk).unwrap();
            assert!(read > 0, "the client closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..read]);
        }
        String::from_utf8(got).unwrap()
    }

    #[test]
    fn sends_share_one_connection_and_reconnect_when_it_breaks() {
        let dir = std::env::temp_dir().join(format!("kissbot-client-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("monitor.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let c = MonitorClient::new("a", 7).socket_path(&path);
        assert!(c.heartbeat());
        assert!(c.log_llm_usage(&LlmCall::new("m", "f", 1, 2)));
        let (mut first, _) = listener.accept().unwrap();
        let lines = read_lines(&mut first, 2);
        assert!(lines.starts_with(r#"{"type": "heartbeat", "channel": "a", "pid": 7}"#), "{lines}");
        assert!(lines.contains(r#""type": "llm_usage""#), "{lines}");

        // The exporter restarts: the kept connection fails with EPIPE and
        // the same send goes out on a new one.
        drop(first);
        assert!(c.unregister());
        let (mut second, _) = listener.accept().unwrap();
        assert_eq!(read_lines(&mut second, 1), "{\"type\": \"unregister\", \"channel\": \"a\", \"pid\": 7}\n");
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
