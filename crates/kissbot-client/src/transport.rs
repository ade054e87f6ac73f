//! The socket: connecting to the exporter and writing lines to it, both
//! bounded by one deadline, and never raising `SIGPIPE`.
//!
//! Everything goes through socket2's safe API; the crate has no `unsafe`.

use std::ffi::c_int;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};

/// Flags of every `send(2)`: with `MSG_NOSIGNAL`, writing to an exporter
/// that has gone away fails with `EPIPE` instead of killing the bot with
/// `SIGPIPE` (a bot in C or Python may not ignore it as Rust programs do).
#[cfg(not(target_vendor = "apple"))]
const SEND_FLAGS: c_int = libc::MSG_NOSIGNAL;

/// Apple platforms have no `MSG_NOSIGNAL`; there `Socket::new` sets
/// `SO_NOSIGPIPE` on the socket instead, which does the same.
#[cfg(target_vendor = "apple")]
const SEND_FLAGS: c_int = 0;

/// The time left until `deadline`, or a timeout error once it has passed
/// (a zero socket timeout would mean "wait forever").
fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
    }
    Ok(left)
}

/// Connects to the Unix stream socket at `path`, giving up at `deadline`.
///
/// The connect is a blocking one bounded by the socket's send timeout, not
/// socket2's `connect_timeout`: that one connects in non-blocking mode, and
/// on a Unix socket whose listen backlog is full a non-blocking connect
/// fails at once with `EAGAIN` instead of waiting for room. A blocking
/// connect waits for room, and Linux bounds that wait by `SO_SNDTIMEO`, so
/// an exporter that is only briefly busy still gets the line.
pub(crate) fn connect(path: &Path, deadline: Instant) -> io::Result<Socket> {
    let bytes = path.as_os_str().as_bytes();
    // An empty path or one starting with NUL would name an unbound or an
    // abstract socket (Linux), and a NUL further on would cut the path
    // short: refuse them all, as the exporter only ever listens on a file.
    if bytes.is_empty() || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path must be non-empty and without NUL"));
    }
    let addr = SockAddr::unix(path).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path of {} bytes is too long for a unix socket address", bytes.len()),
        )
    })?;
    // `Socket::new` sets close-on-exec (and `SO_NOSIGPIPE` on Apple
    // platforms), so a bot that spawns processes does not leak the socket.
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    loop {
        socket.set_write_timeout(Some(remaining(deadline)?))?;
        match socket.connect(&addr) {
            Ok(()) => return Ok(socket),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out connecting (listen backlog full)"))
            }
            Err(e) => return Err(e),
        }
    }
}

/// Writes all of `buf`, giving up at `deadline`, without ever raising
/// `SIGPIPE` when the exporter has gone away.
pub(crate) fn write_all(socket: &Socket, mut buf: &[u8], deadline: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        socket.set_write_timeout(Some(remaining(deadline)?))?;
        match socket.send_with_flags(buf, SEND_FLAGS) {
            // A stream socket only writes nothing for an empty buffer; loop
            // no further if it ever does.
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "the socket took no bytes")),
            // `min` keeps a misbehaving kernel from making the slice panic.
            Ok(n) => buf = &buf[n.min(buf.len())..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out writing (exporter not reading)"))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Read;
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;

    /// A fresh directory for one test's sockets, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("kissbot-client-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(2)
    }

    #[test]
    fn writes_reach_the_listener() {
        let dir = TempDir::new("writes");
        let path = dir.0.join("monitor.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let socket = connect(&path, soon()).unwrap();
        write_all(&socket, b"one\n", soon()).unwrap();
        write_all(&socket, b"two\n", soon()).unwrap();
        drop(socket);
        let (mut peer, _) = listener.accept().unwrap();
        let mut got = String::new();
        peer.read_to_string(&mut got).unwrap();
        assert_eq!(got, "one\ntwo\n");
    }

    #[test]
    fn bad_paths_are_refused_before_any_syscall() {
        for path in ["", "\0abstract", "a\0b"] {
            let err = connect(Path::new(path), soon()).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{path:?}");
        }
        let err = connect(Path::new(&"x".repeat(200)), soon()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("200 bytes"), "{err}");
    }

    #[test]
    fn a_passed_deadline_fails_without_waiting() {
        let dir = TempDir::new("deadline");
        let path = dir.0.join("monitor.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let err = connect(&path, Instant::now()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn a_gone_peer_is_an_error_not_a_signal() {
        let dir = TempDir::new("gone");
        let path = dir.0.join("monitor.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let socket = connect(&path, soon()).unwrap();
        drop(listener.accept().unwrap());
        drop(listener);
        // The first write may still land in the closed peer's buffer; the
        // ones after it fail with EPIPE.
        let failed = (0..10).any(|_| write_all(&socket, b"x\n", soon()).is_err());
        assert!(failed, "writes to a closed peer kept succeeding");
    }

    #[test]
    fn a_full_backlog_waits_for_the_deadline_then_times_out() {
        let dir = TempDir::new("backlog");
        let path = dir.0.join("monitor.sock");
        // A listener that never accepts, with the smallest backlog.
        let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        listener.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        listener.listen(0).unwrap();
        let timeout = Duration::from_millis(300);
        let mut queued = Vec::new();
        let outcome = (0..16).find_map(|_| {
            let started = Instant::now();
            match connect(&path, started + timeout) {
                Ok(socket) => {
                    queued.push(socket);
                    None
                }
                Err(e) => Some((e, started.elapsed())),
            }
        });
        let (err, took) = outcome.expect("a full backlog never made a connect fail");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(took >= timeout / 2 && took < Duration::from_secs(2), "gave up after {took:?}");
    }
}
