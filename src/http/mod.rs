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
//!
//! - `server`: accepting, admission and eviction of connections, timeouts,
//!   TLS and authentication; hands each request to `routes`.
//! - `routes`: what each path answers.
//! - `scrape`: renders of `/metrics` shared by concurrent scrapes, and the
//!   memory budget of large response bodies.
//! - `landing`: the HTML landing page.

mod landing;
mod routes;
mod scrape;
mod server;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::state::State;
use crate::store::WriterStatus;

pub(crate) use scrape::ScrapeCache;
pub(crate) use server::{bind, serve, Limits};

/// What the HTTP handlers read.
pub(crate) struct App {
    /// Metrics and their registry.
    pub(crate) metrics: Metrics,
    /// The live registry of bots.
    pub(crate) state: Arc<Mutex<State>>,
    /// Where metrics are served.
    pub(crate) telemetry_path: String,
    /// The socket path, for the landing page and health.
    pub(crate) socket_path: PathBuf,
    /// The database path, for health.
    pub(crate) db_path: PathBuf,
    /// True while the socket accepts connections.
    pub(crate) socket_listening: Arc<AtomicBool>,
    /// Liveness of the writer thread.
    pub(crate) writer: Arc<WriterStatus>,
    /// Re-reads the pricing file.
    pub(crate) reloader: Arc<Reloader>,
    /// Whether `POST /-/reload` is allowed.
    pub(crate) enable_lifecycle: bool,
    /// Bounds on `/api/usage` queries.
    pub(crate) usage: UsageLimits,
    /// Renders shared by concurrent scrapes, and the response memory budget.
    pub(crate) scrapes: ScrapeCache,
}

/// Bounds on `/api/usage` queries, which read SQLite and can be slow on a
/// large file.
pub(crate) struct UsageLimits {
    /// One permit per query running; a query's thread holds it until it ends,
    /// even if its client has gone, so the bound counts real work.
    pub(crate) permits: Arc<tokio::sync::Semaphore>,
    /// A query is stopped after this long.
    pub(crate) timeout: Duration,
    /// Set at shutdown: running queries stop.
    pub(crate) stopping: Arc<AtomicBool>,
}
