//! The HTTP server (hyper): metrics, landing page, health and a JSON API.
//!
//! Rendering the metrics walks every bot, so it runs on the blocking pool
//! rather than on a runtime worker, where a large fleet would stall other
//! requests and socket ingest.
//!
//! Access control and hardening: TLS and basic authentication come from
//! the web configuration file ([`crate::web_config`]); every endpoint but
//! the liveness probes (`/healthz`, `/health/live`) then needs credentials.
//! A request must send its head within 10 s and keep it under 32 KiB and
//! 100 fields (431 beyond); bodies over 4 KiB are refused with 413; a
//! connection that moves no byte for 60 s is closed; and at most
//! `--web.max-connections` are open at once, a newcomer closing the
//! connection that has waited longest for a request, so that a slowloris
//! cannot starve a scrape.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};
use hyper::header::{
    HeaderName, HeaderValue, ACCEPT_ENCODING, ALLOW, AUTHORIZATION, CONNECTION, CONTENT_ENCODING, CONTENT_TYPE,
    RETRY_AFTER, VARY, WWW_AUTHENTICATE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::IntGauge;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::clock::{format_time, parse_time, unix_now};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::state::{State, Status};
use crate::store::usage::{self, UsageError, UsageGroup, UsageQuery};
use crate::store::WriterStatus;
use crate::web_config::{BasicAuth, WebConfig};

/// The content type of the Prometheus text format 0.0.4.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

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

/// The `WWW-Authenticate` challenge of a 401 (realm [`crate::web_config::REALM`]).
const CHALLENGE: &str = "Basic realm=\"kissbot-exporter\", charset=\"UTF-8\"";

/// Largest request body accepted; no endpoint reads one.
const MAX_REQUEST_BODY: u64 = 4 * 1024;

/// The writer is considered stuck when its loop has not turned this long.
const WRITER_STUCK_AFTER: f64 = 30.0;

/// The queue is reported degraded above this fill ratio.
const QUEUE_DEGRADED_RATIO: f64 = 0.9;

/// What the HTTP handlers read.
pub struct App {
    /// Metrics and their registry.
    pub metrics: Metrics,
    /// The live registry of bots.
    pub state: Arc<Mutex<State>>,
    /// Where metrics are served.
    pub telemetry_path: String,
    /// The socket path, for the landing page and health.
    pub socket_path: PathBuf,
    /// The database path, for health.
    pub db_path: PathBuf,
    /// True while the socket accepts connections.
    pub socket_listening: Arc<AtomicBool>,
    /// Liveness of the writer thread.
    pub writer: Arc<WriterStatus>,
    /// Re-reads the pricing file.
    pub reloader: Arc<crate::Reloader>,
    /// Whether `POST /-/reload` is allowed.
    pub enable_lifecycle: bool,
    /// Bounds on `/api/usage` queries.
    pub usage: UsageLimits,
    /// Renders shared by concurrent scrapes, and the response memory budget.
    pub scrapes: ScrapeCache,
}

/// Bounds on `/api/usage` queries, which read SQLite and can be slow on a
/// large file.
pub struct UsageLimits {
    /// One permit per query running; a query's thread holds it until it ends,
    /// even if its client has gone, so the bound counts real work.
    pub permits: Arc<tokio::sync::Semaphore>,
    /// A query is stopped after this long.
    pub timeout: Duration,
    /// Set at shutdown: running queries stop.
    pub stopping: Arc<AtomicBool>,
}

/// A response body that counts itself in the budget while any copy of it is
/// alive (hyper's write buffer included).
struct Accounted {
    data: Vec<u8>,
    live: IntGauge,
}

impl AsRef<[u8]> for Accounted {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Accounted {
    fn drop(&mut self) {
        self.live.sub(self.data.len() as i64);
    }
}

/// One rendering of `/metrics`, shared by every scrape that can use it.
struct Generation {
    plain: Bytes,
    gzip: std::sync::OnceLock<Bytes>,
    done_at: Instant,
}

/// Coalesces concurrent scrapes onto one render and bounds the memory that
/// response bodies hold.
///
/// A scrape that arrives while a render runs waits for it and sends its
/// result; one that arrives later renders anew — unless the bodies still
/// held by connections (slow or non-reading clients) exceed the budget
/// (`--web.max-response-memory-mib`), in which case it sends the newest body
/// too. Only one render runs at a time. The other large pages (the landing
/// page, the bots list) count in the same budget and answer 503 beyond it,
/// so a client that requests and never reads cannot make the exporter hold
/// more.
pub struct ScrapeCache {
    current: tokio::sync::Mutex<Option<Arc<Generation>>>,
    live: IntGauge,
    budget: usize,
}

impl ScrapeCache {
    /// An empty cache: bodies count in `live`, at most `budget` bytes.
    pub fn new(live: IntGauge, budget: usize) -> ScrapeCache {
        ScrapeCache { current: tokio::sync::Mutex::new(None), live, budget }
    }

    /// Bytes held by large response bodies now.
    pub fn live_bytes(&self) -> usize {
        usize::try_from(self.live.get()).unwrap_or(0)
    }

    fn over_budget(&self, more: usize) -> bool {
        self.live_bytes().saturating_add(more) > self.budget
    }

    /// Wraps a body so it counts in the budget while alive.
    fn account(&self, data: Vec<u8>) -> Bytes {
        self.live.add(data.len() as i64);
        Bytes::from_owner(Accounted { data, live: self.live.clone() })
    }

    /// The metrics body for a scrape that arrived at `arrived`.
    async fn get(&self, metrics: &Metrics, arrived: Instant, gzip: bool) -> std::result::Result<Bytes, String> {
        let mut current = self.current.lock().await;
        let reuse = match &*current {
            Some(g) if g.done_at >= arrived => Some(g.clone()),
            Some(g) if self.over_budget(g.plain.len()) => {
                debug!(
                    live_bytes = self.live_bytes(),
                    "response memory budget reached; scrape served the newest render"
                );
                Some(g.clone())
            }
            _ => None,
        };
        let generation = match reuse {
            Some(g) => g,
            None => {
                let m = metrics.clone();
                let text = tokio::task::spawn_blocking(move || m.render()).await.map_err(|e| e.to_string())?;
                let g = Arc::new(Generation {
                    plain: self.account(text.into_bytes()),
                    gzip: std::sync::OnceLock::new(),
                    done_at: Instant::now(),
                });
                *current = Some(g.clone());
                g
            }
        };
        if !gzip {
            return Ok(generation.plain.clone());
        }
        if let Some(z) = generation.gzip.get() {
            return Ok(z.clone());
        }
        let plain = generation.plain.clone();
        let z = tokio::task::spawn_blocking(move || {
            let mut enc =
                flate2::write::GzEncoder::new(Vec::with_capacity(plain.len() / 4), flate2::Compression::fast());
            enc.write_all(&plain).and_then(|_| enc.finish())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let z = self.account(z);
        let _ = generation.gzip.set(z.clone());
        Ok(z)
    }
}

/// Binds the HTTP listener; the bound address is returned so that port 0 works.
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await.map_err(|source| Error::HttpBind { addr, source })?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Connection limits of the HTTP server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most connections open at once. When full, a new connection closes
    /// the one that has waited longest for a request (a slowloris peer or
    /// an idle keep-alive); if every connection is serving a request, the
    /// new one is closed instead.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_connections: 256 }
    }
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
pub async fn serve(listener: TcpListener, app: Arc<App>, web: WebConfig, limits: Limits, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    let tls = web.tls().map(TlsAcceptor::from);
    let auth = web.basic_auth();
    if let Ok(addr) = listener.local_addr() {
        info!(address = %addr, tls = tls.is_some(), basic_auth = auth.is_some(), "http server listening");
    }
    let headers = web
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((HeaderName::from_bytes(k.as_bytes()).ok()?, HeaderValue::from_str(v).ok()?)))
        .collect();
    let shared = Arc::new(Shared { app, auth, headers });
    let slots = Arc::new(Slots::new(limits.max_connections));
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
    tracker.close();
    tracker.wait().await;
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
    eviction_log: crate::ratelimit::RateLimitedLog,
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
            eviction_log: crate::ratelimit::RateLimitedLog::new(Duration::from_secs(10)),
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

fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    response(status, "application/json", value.to_string())
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", body)
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
    let liveness = path == "/healthz" || path == "/health/live";
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

async fn dispatch(app: &App, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path == "/-/reload" {
        return reload(app, &req).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if path == app.telemetry_path {
        return metrics(app, &req).await;
    }
    match path {
        "/" => {
            // Like /metrics, these walk every bot: off the runtime's workers.
            if app.scrapes.over_budget(0) {
                return busy("landing page");
            }
            let state = app.state.clone();
            let (socket, path) = (app.socket_path.clone(), app.telemetry_path.clone());
            match tokio::task::spawn_blocking(move || landing_page(&state, &socket, &path)).await {
                Ok(html) => {
                    response(StatusCode::OK, "text/html; charset=utf-8", app.scrapes.account(html.into_bytes()))
                }
                Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "failed\n"),
            }
        }
        "/health" => health(app),
        "/healthz" | "/health/live" => text(StatusCode::OK, "ok\n"),
        "/health/ready" => {
            if app.socket_listening.load(Ordering::SeqCst) && app.writer.running.load(Ordering::SeqCst) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        "/api/bots" => {
            if app.scrapes.over_budget(0) {
                return busy("bots list");
            }
            let state = app.state.clone();
            match tokio::task::spawn_blocking(move || bots_json(&state).to_string()).await {
                Ok(v) => response(StatusCode::OK, "application/json", app.scrapes.account(v.into_bytes())),
                Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "failed\n"),
            }
        }
        "/api/usage" => usage(app, req.uri().query().unwrap_or("")).await,
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Whether an `Accept-Encoding` value accepts gzip, honouring q-values:
/// `gzip;q=0` refuses it, and `*` stands for it when gzip is not named.
pub fn accepts_gzip(header: &str) -> bool {
    let mut star = None;
    for item in header.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| {
                let (k, v) = p.split_once('=')?;
                k.trim().eq_ignore_ascii_case("q").then(|| v.trim().parse::<f64>().ok()).flatten()
            })
            .next()
            .unwrap_or(1.0);
        match coding.as_str() {
            "gzip" | "x-gzip" => return q > 0.0,
            "*" => star = Some(q > 0.0),
            _ => {}
        }
    }
    star.unwrap_or(false)
}

async fn metrics(app: &App, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let arrived = Instant::now();
    let gzip = req.headers().get(ACCEPT_ENCODING).and_then(|v| v.to_str().ok()).is_some_and(accepts_gzip);
    match app.scrapes.get(&app.metrics, arrived, gzip).await {
        Ok(body) => {
            let mut r = response(StatusCode::OK, METRICS_CONTENT_TYPE, body);
            r.headers_mut().insert(VARY, HeaderValue::from_static("Accept-Encoding"));
            if gzip {
                r.headers_mut().insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            }
            r
        }
        Err(e) => {
            warn!(error = %e, "rendering metrics failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, "rendering metrics failed\n")
        }
    }
}

/// 503 for a page that would take the response memory over its budget.
fn busy(what: &str) -> Response<Full<Bytes>> {
    let mut r =
        text(StatusCode::SERVICE_UNAVAILABLE, format!("{what}: too many large responses in flight; retry shortly\n"));
    r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("5"));
    r
}

async fn reload(app: &App, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    if !app.enable_lifecycle {
        return text(StatusCode::FORBIDDEN, "lifecycle API is not enabled (start with --web.enable-lifecycle)\n");
    }
    let r = app.reloader.clone();
    match tokio::task::spawn_blocking(move || r.reload()).await {
        Ok(Ok(())) => text(StatusCode::OK, "reloaded\n"),
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "reload failed\n"),
    }
}

/// Sets a flag when dropped: hyper drops a request's future when its client
/// goes away, and the query thread sees the flag and stops.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// `/api/usage?since=24h&group_by=model`: sums from SQLite. `since` is a
/// duration back from now or a time in any form the database holds. At most
/// `--web.max-usage-queries` run at once (503 with `Retry-After` beyond),
/// each on a thread of its own, stopped when its client goes away, after
/// `--web.usage-query-timeout`, or at shutdown.
async fn usage(app: &App, query: &str) -> Response<Full<Bytes>> {
    let mut since = None;
    let mut group_by = usage::GroupBy::Model;
    for (k, v) in form_pairs(query) {
        match k.as_str() {
            "since" => match crate::config::parse_duration(&v) {
                Ok(d) => since = Some(unix_now() - d.as_secs_f64()),
                Err(_) => match parse_time(&v) {
                    Some(t) => since = Some(t),
                    None => {
                        return bad_request(&format!("since={v:?} is neither a duration (24h) nor an ISO-8601 time"))
                    }
                },
            },
            "group_by" => match usage::GroupBy::parse(&v) {
                Some(g) => group_by = g,
                None => return bad_request("group_by must be channel, model or feature"),
            },
            _ => return bad_request(&format!("unknown parameter {k:?}")),
        }
    }
    let Ok(permit) = app.usage.permits.clone().try_acquire_owned() else {
        let mut r = json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "too many usage queries running (--web.max-usage-queries); retry shortly"}),
        );
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("5"));
        return r;
    };
    let pricing = app.state.lock().unwrap_or_else(|e| e.into_inner()).pricing().clone();
    let q = UsageQuery { path: app.db_path.clone(), since, group_by, pricing, timeout: app.usage.timeout };
    let cancel = Arc::new(AtomicBool::new(false));
    let _cancel_on_drop = CancelOnDrop(cancel.clone());
    let stopping = app.usage.stopping.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("kissbot-usage".into()).spawn(move || {
        let result = usage::usage_totals(&q, cancel, stopping);
        drop(permit);
        let _ = tx.send(result);
    });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start a usage query thread");
        return json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"error": "cannot start the query"}));
    }
    match rx.await {
        Ok(Ok(groups)) => {
            let mut total = UsageGroup::default();
            for g in &groups {
                total.add(g);
            }
            json_response(
                StatusCode::OK,
                &json!({
                    "since": since.map(format_time),
                    "group_by": group_by.column(),
                    "groups": groups,
                    "total": total,
                }),
            )
        }
        Ok(Err(UsageError::Stopped(usage::Stopped::Timeout))) => {
            warn!(timeout = ?app.usage.timeout, "usage query stopped at its time limit");
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"error": format!("query took longer than --web.usage-query-timeout ({:?}); narrow it with since=", app.usage.timeout)}),
            )
        }
        Ok(Err(UsageError::Stopped(usage::Stopped::Cancelled))) => {
            json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"error": "query cancelled"}))
        }
        Ok(Err(UsageError::Failed(e))) => {
            warn!(error = %e, "usage query failed");
            json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"error": e.to_string()}))
        }
        Err(_) => json_response(StatusCode::INTERNAL_SERVER_ERROR, &json!({"error": "usage query failed"})),
    }
}

/// The decoded `key=value` pairs of a query string.
fn form_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

fn bad_request(msg: &str) -> Response<Full<Bytes>> {
    json_response(StatusCode::BAD_REQUEST, &json!({ "error": msg }))
}

fn health(app: &App) -> Response<Full<Bytes>> {
    let socket_ok = app.socket_listening.load(Ordering::SeqCst);
    let db_ok = app.metrics.db_up.get() == 1;
    let depth = app.metrics.queue_depth.get();
    let capacity = app.metrics.queue_capacity.get().max(1);
    let queue_ok = (depth as f64) < QUEUE_DEGRADED_RATIO * capacity as f64;
    let writer_age = unix_now() - app.writer.last_loop.load(Ordering::Relaxed) as f64;
    let writer_ok = app.writer.running.load(Ordering::SeqCst) && writer_age < WRITER_STUCK_AFTER;
    let word = |ok: bool| if ok { "healthy" } else { "degraded" };
    let all = socket_ok && db_ok && queue_ok && writer_ok;
    let body = json!({
        "status": word(all),
        "version": env!("CARGO_PKG_VERSION"),
        "components": {
            "socket": {"status": word(socket_ok), "path": app.socket_path.display().to_string()},
            "database": {"status": word(db_ok), "path": app.db_path.display().to_string(),
                         "write_errors": app.metrics.db_write_errors.get()},
            "queue": {"status": word(queue_ok), "depth": depth, "capacity": capacity},
            "writer": {"status": word(writer_ok), "last_loop_age_seconds": writer_age.max(0.0).round()},
        }
    });
    json_response(if all { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, &body)
}

/// A snapshot of the bots, sorted by channel, taken under the lock.
fn bot_rows(state: &Mutex<State>) -> Vec<crate::state::Bot> {
    let mut bots: Vec<_> = state.lock().unwrap_or_else(|e| e.into_inner()).bots().cloned().collect();
    bots.sort_by(|a, b| a.channel.cmp(&b.channel));
    bots
}

fn bots_json(state: &Mutex<State>) -> serde_json::Value {
    let now = unix_now();
    let bots: Vec<_> = bot_rows(state)
        .into_iter()
        .map(|b| {
            let features: serde_json::Map<_, _> = b.features.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            json!({
                "channel": b.channel,
                "pid": b.pid,
                "status": b.status.as_str(),
                "features": features,
                "registered_at": format_time(b.registered_at),
                "last_heartbeat": format_time(b.last_heartbeat),
                "heartbeat_age_seconds": (now - b.last_heartbeat).max(0.0),
                "heartbeats": b.heartbeats,
                "restarts": b.restarts,
            })
        })
        .collect();
    json!({ "bots": bots })
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn landing_page(state: &Mutex<State>, socket_path: &std::path::Path, telemetry_path: &str) -> String {
    let now = unix_now();
    let bots = bot_rows(state);
    let count = |s: Status| bots.iter().filter(|b| b.status == s).count();
    let mut html = String::with_capacity(4096 + bots.len() * 256);
    let path = html_escape(telemetry_path);
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>KissBot Exporter</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}.online{{color:#1a7f37}}\
         .stale{{color:#9a6700}}.dead{{color:#cf222e}}.offline{{color:#57606a}}</style></head><body>\n\
         <h1>KissBot Exporter</h1>\n<p>Version {version}. <a href=\"{path}\">Metrics</a> · \
         <a href=\"/health\">Health</a> · <a href=\"/api/bots\">Bots (JSON)</a> · \
         <a href=\"/api/usage?since=24h&amp;group_by=model\">LLM usage, last 24 h (JSON)</a></p>\n\
         <p>Socket <code>{socket}</code>. {n} bots: {on} online, {st} stale, {off} offline, {dead} dead.</p>\n\
         <table><tr><th>Channel</th><th>State</th><th>PID</th><th>Heartbeat age</th><th>Registered</th>\
         <th>Restarts</th><th>Features</th></tr>\n",
        version = env!("CARGO_PKG_VERSION"),
        socket = html_escape(&socket_path.display().to_string()),
        n = bots.len(),
        on = count(Status::Online),
        st = count(Status::Stale),
        off = count(Status::Offline),
        dead = count(Status::Dead),
    );
    for b in &bots {
        let features: Vec<String> =
            b.features.iter().map(|(f, on)| format!("{}{}", if *on { "" } else { "-" }, html_escape(f))).collect();
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td class=\"{s}\">{s}</td><td>{}</td><td>{:.0}s</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            html_escape(&b.channel),
            b.pid,
            (now - b.last_heartbeat).max(0.0),
            html_escape(&format_time(b.registered_at)),
            b.restarts,
            features.join(" "),
            s = b.status.as_str(),
        );
    }
    html.push_str("</table>\n</body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::{accepts_gzip, html_escape, CHALLENGE};

    #[test]
    fn gzip_q_values() {
        assert!(accepts_gzip("gzip"));
        assert!(accepts_gzip("deflate, gzip;q=0.5"));
        assert!(accepts_gzip("GZIP"));
        assert!(accepts_gzip("*"));
        assert!(!accepts_gzip("gzip;q=0"));
        assert!(!accepts_gzip("gzip;q=0, identity"));
        assert!(!accepts_gzip("gzip; q=0.0, *"));
        assert!(!accepts_gzip("identity"));
        assert!(!accepts_gzip("*;q=0"));
        assert!(!accepts_gzip(""));
    }

    #[test]
    fn challenge_names_the_realm() {
        assert!(CHALLENGE.contains(&format!("realm=\"{}\"", crate::web_config::REALM)));
    }

    #[test]
    fn escapes_html() {
        assert_eq!(
            html_escape(r#"<script>alert("x'&")</script>"#),
            "&lt;script&gt;alert(&quot;x&#39;&amp;&quot;)&lt;/script&gt;"
        );
    }
}
