//! Accepting HTTP connections: admission within `--web.max-connections`
//! (evicting the connection that has waited longest for a request), header,
//! TLS-handshake and idle timeouts, request limits and authentication. Each
//! admitted request goes to [`super::routes::dispatch`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::routes::{dispatch, text};
use super::App;
use crate::config::ListenAddress;
use crate::error::{Error, Result};
use crate::ratelimit::RateLimitedLog;
use crate::web_config::{BasicAuth, WebConfig};

/// A request must send its headers within this time (HTTP slowloris guard);
/// hyper also applies it to a keep-alive connection waiting for its next
/// request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS handshake must finish within this time.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection that moves no byte either way for this long is closed (a
/// peer that stopped reading its response, for instance).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest request head (request line and headers); a larger one is
/// answered with 431 and the connection closed.
const MAX_HEAD_BYTES: usize = 32 * 1024;

/// Most bytes hyper buffers for a connection.
const MAX_BUF_BYTES: usize = 64 * 1024;

/// Most header fields in a request (431 beyond).
const MAX_HEADERS: usize = 100;

/// The `WWW-Authenticate` challenge of a 401: realm `kissbot-exporter`, UTF-8
/// credentials (RFC 7617).
const CHALLENGE: &str = "Basic realm=\"kissbot-exporter\", charset=\"UTF-8\"";

/// Largest request body accepted; no endpoint reads one.
const MAX_REQUEST_BODY: u64 = 4 * 1024;

/// Binds one listener per `--web.listen-address`; the bound addresses are
/// returned so that port 0 works. A host name binds the first address it
/// resolves to that can be bound.
pub(crate) async fn bind(addrs: &[ListenAddress]) -> Result<Vec<(TcpListener, SocketAddr)>> {
    let mut out = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let err = |source| Error::HttpBind { addr: addr.to_string(), source };
        let resolved = addr.resolve().map_err(err)?;
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the name resolves to no address");
        let mut bound = None;
        for a in resolved {
            match TcpListener::bind(a).await {
                Ok(l) => {
                    bound = Some(l);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let listener = bound.ok_or_else(|| err(last))?;
        let local = listener.local_addr()?;
        out.push((listener, local));
    }
    Ok(out)
}

/// Connection limits of the HTTP server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Most connections open at once. When full, a new connection closes
    /// the one that has waited longest for a request (a slowloris peer or
    /// an idle keep-alive); if every connection is serving a request, the
    /// new one is closed instead.
    pub(crate) max_connections: usize,
}

/// What every connection task shares.
struct Shared {
    app: Arc<App>,
    auth: Option<Arc<BasicAuth>>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// Serves HTTP (or HTTPS, with `tls_server_config`) until `shutdown`, then
/// lets requests in flight finish. `web` adds TLS, basic authentication
/// and response headers; `limits` bounds the open connections.
/// Every listener shares the connection limit, the authentication and the
/// handlers.
pub(crate) async fn serve(
    listeners: Vec<TcpListener>,
    app: Arc<App>,
    web: WebConfig,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let tls = web.tls().map(TlsAcceptor::from);
    let auth = web.basic_auth();
    for listener in &listeners {
        if let Ok(addr) = listener.local_addr() {
            info!(address = %addr, tls = tls.is_some(), basic_auth = auth.is_some(), "http server listening");
        }
    }
    let headers = web
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((HeaderName::from_bytes(k.as_bytes()).ok()?, HeaderValue::from_str(v).ok()?)))
        .collect();
    let shared = Arc::new(Shared { app, auth, headers });
    let slots = Arc::new(Slots::new(limits.max_connections));
    let mut loops = tokio::task::JoinSet::new();
    for listener in listeners {
        let accept = Accept { listener, slots: slots.clone(), shared: shared.clone(), tls: tls.clone() };
        loops.spawn(accept.run(tracker.clone(), shutdown.clone()));
    }
    while loops.join_next().await.is_some() {}
    tracker.close();
    tracker.wait().await;
}

/// The accept loop of one listener.
struct Accept {
    listener: TcpListener,
    slots: Arc<Slots>,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
}

impl Accept {
    async fn run(self, tracker: TaskTracker, shutdown: CancellationToken) {
        let Accept { listener, slots, shared, tls } = self;
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "http accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Some(slot) = slots.admit() else {
                debug!(peer = %peer, "http connection refused: every connection is serving a request");
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let io = Tracked { inner: stream, slot: slot.slot.clone() };
            tracker.spawn(connection(io, tls.clone(), shared.clone(), slot, shutdown.clone()));
        }
    }
}

/// One connection: the TLS handshake if any, then HTTP/1.1 until the peer
/// closes, the connection goes idle, it is evicted, or shutdown.
async fn connection(
    io: Tracked<TcpStream>,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    guard: SlotGuard,
    shutdown: CancellationToken,
) {
    let slot = guard.slot.clone();
    match tls {
        None => drive(TokioIo::new(io), shared, slot, shutdown).await,
        Some(acceptor) => {
            let handshake = tokio::select! {
                r = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(io)) => r,
                _ = slot.evict.cancelled() => return,
                _ = shutdown.cancelled() => return,
            };
            match handshake {
                Ok(Ok(stream)) => drive(TokioIo::new(stream), shared, slot, shutdown).await,
                Ok(Err(e)) => debug!(error = %e, "tls handshake failed"),
                Err(_) => debug!("tls handshake timed out"),
            }
        }
    }
}

async fn drive<I>(io: I, shared: Arc<Shared>, slot: Arc<Slot>, shutdown: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let request_slot = slot.clone();
    let service = service_fn(move |req| {
        let shared = shared.clone();
        let slot = request_slot.clone();
        async move {
            let mut r = route(&shared, &slot, req).await;
            for (k, v) in &shared.headers {
                r.headers_mut().insert(k.clone(), v.clone());
            }
            Ok::<_, Infallible>(r)
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_BYTES)
        .max_header_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let idle = tokio::time::sleep(IDLE_TIMEOUT);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(error = %e, "http connection ended with an error");
                }
                return;
            }
            _ = slot.evict.cancelled() => {
                debug!("http connection closed to make room for a new one");
                return;
            }
            _ = idle.as_mut() => {
                let quiet = slot.quiet_for();
                if quiet >= IDLE_TIMEOUT {
                    debug!("http connection closed after moving no data for {IDLE_TIMEOUT:?}");
                    return;
                }
                idle.as_mut().reset(tokio::time::Instant::now() + (IDLE_TIMEOUT - quiet));
            }
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                return;
            }
        }
    }
}

/// Milliseconds since `base`, for atomics.
fn millis_since(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The bookkeeping of one open connection.
struct Slot {
    base: Instant,
    /// Requests being served now (0 or 1 on HTTP/1.1).
    busy: AtomicUsize,
    /// When the connection last started waiting for a request (accept, or
    /// the end of the previous response), in ms since `base`.
    waiting_since: AtomicU64,
    /// When a byte last moved either way, in ms since `base`.
    last_io: AtomicU64,
    /// Cancelled to close the connection for a newcomer.
    evict: CancellationToken,
}

impl Slot {
    fn touch(&self) {
        self.last_io.store(millis_since(self.base), Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        Duration::from_millis(millis_since(self.base).saturating_sub(self.last_io.load(Ordering::Relaxed)))
    }
}

/// The open connections, bounded.
struct Slots {
    max: usize,
    base: Instant,
    inner: Mutex<SlotTable>,
    eviction_log: RateLimitedLog,
}

struct SlotTable {
    next_id: u64,
    open: HashMap<u64, Arc<Slot>>,
}

impl Slots {
    fn new(max: usize) -> Slots {
        Slots {
            max: max.max(1),
            base: Instant::now(),
            inner: Mutex::new(SlotTable { next_id: 0, open: HashMap::new() }),
            eviction_log: RateLimitedLog::new(Duration::from_secs(10)),
        }
    }

    /// Takes a slot for a new connection, evicting the connection that has
    /// waited longest for a request when full. `None` when every open
    /// connection is serving a request.
    fn admit(self: &Arc<Self>) -> Option<SlotGuard> {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if t.open.len() >= self.max {
            let victim = t
                .open
                .iter()
                .filter(|(_, s)| s.busy.load(Ordering::SeqCst) == 0)
                .min_by_key(|(_, s)| s.waiting_since.load(Ordering::Relaxed))
                .map(|(id, _)| *id)?;
            if let Some(s) = t.open.remove(&victim) {
                s.evict.cancel();
            }
            self.note_eviction();
        }
        let now = millis_since(self.base);
        let slot = Arc::new(Slot {
            base: self.base,
            busy: AtomicUsize::new(0),
            waiting_since: AtomicU64::new(now),
            last_io: AtomicU64::new(now),
            evict: CancellationToken::new(),
        });
        let id = t.next_id;
        t.next_id += 1;
        t.open.insert(id, slot.clone());
        Some(SlotGuard { slots: self.clone(), id, slot })
    }

    /// Logs evictions at most every 10 s: they mean the limit is reached.
    fn note_eviction(&self) {
        if let Some(suppressed) = self.eviction_log.allow() {
            warn!(
                max_connections = self.max,
                suppressed,
                "http connection limit reached; closing connections that send no request (raise --web.max-connections if this is legitimate load)"
            );
        }
    }
}

/// Frees the slot when the connection task ends.
struct SlotGuard {
    slots: Arc<Slots>,
    id: u64,
    slot: Arc<Slot>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut t = self.slots.inner.lock().unwrap_or_else(|e| e.into_inner());
        t.open.remove(&self.id);
    }
}

/// Marks a connection busy while an authenticated request is served; when
/// the response is ready it starts waiting for the next request. A request
/// still being authenticated does not count as busy, so that connections
/// queueing wrong passwords for bcrypt can be evicted like slow ones.
struct Busy(Arc<Slot>);

impl Busy {
    fn new(slot: Arc<Slot>) -> Busy {
        slot.busy.fetch_add(1, Ordering::SeqCst);
        Busy(slot)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.waiting_since.store(millis_since(self.0.base), Ordering::Relaxed);
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A socket that records when bytes last moved, for the idle timeout.
struct Tracked<S> {
    inner: S,
    slot: Arc<Slot>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.slot.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.slot.touch();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.slot.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Request limits and authentication, then [`dispatch`].
async fn route(shared: &Shared, slot: &Arc<Slot>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    // No endpoint takes a body: refuse a large or unbounded one and close,
    // rather than read it or leave it in the connection.
    if !matches!(req.body().size_hint().upper(), Some(n) if n <= MAX_REQUEST_BODY) {
        let mut r = text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
        r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    let path = req.uri().path();
    let liveness = matches!(path, "/healthz" | "/health/live" | "/-/healthy");
    if let (Some(auth), false) = (&shared.auth, liveness) {
        if !auth.check(req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes)).await {
            debug!(path, "http request without valid credentials");
            let mut r = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
            r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static(CHALLENGE));
            return r;
        }
    }
    let _busy = Busy::new(slot.clone());
    dispatch(&shared.app, req).await
}
