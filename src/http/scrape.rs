//! Renders of `/metrics` shared by concurrent scrapes, and the budget of
//! memory that large response bodies may hold.

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use prometheus::IntGauge;
use tracing::debug;

use crate::clock::unix_now;
use crate::metrics::Metrics;
use crate::state::State;

/// A response body that counts itself in the budget while any copy of it is
/// alive (hyper's write buffer included).
struct Accounted {
    data: Vec<u8>,
    live: IntGauge,
    /// Where a metrics buffer goes back to when the last response using it
    /// is done, to be rendered into again.
    spare: Option<Arc<Mutex<Option<Vec<u8>>>>>,
}

impl AsRef<[u8]> for Accounted {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Accounted {
    fn drop(&mut self) {
        self.live.sub(self.data.len() as i64);
        if let Some(spare) = &self.spare {
            let mut slot = spare.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(std::mem::take(&mut self.data));
            }
        }
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
    /// The buffer of an earlier render that no response uses any more.
    spare: Arc<Mutex<Option<Vec<u8>>>>,
}

impl ScrapeCache {
    /// An empty cache: bodies count in `live`, at most `budget` bytes.
    pub fn new(live: IntGauge, budget: usize) -> ScrapeCache {
        ScrapeCache { current: tokio::sync::Mutex::new(None), live, budget, spare: Arc::new(Mutex::new(None)) }
    }

    /// Bytes held by large response bodies now.
    pub fn live_bytes(&self) -> usize {
        usize::try_from(self.live.get()).unwrap_or(0)
    }

    pub(super) fn over_budget(&self, more: usize) -> bool {
        self.live_bytes().saturating_add(more) > self.budget
    }

    /// Wraps a body so it counts in the budget while alive.
    pub(super) fn account(&self, data: Vec<u8>) -> Bytes {
        self.live.add(data.len() as i64);
        Bytes::from_owner(Accounted { data, live: self.live.clone(), spare: None })
    }

    /// Wraps a rendered metrics body; its buffer is kept for the next render
    /// once no response uses it. Rendering tens of megabytes into a fresh
    /// allocation every scrape costs page faults and, with glibc, lets the
    /// heap fragment so that the resident size creeps up scrape by scrape.
    fn account_reusable(&self, data: Vec<u8>) -> Bytes {
        self.live.add(data.len() as i64);
        Bytes::from_owner(Accounted { data, live: self.live.clone(), spare: Some(self.spare.clone()) })
    }

    /// The metrics body for a scrape that arrived at `arrived`.
    pub(super) async fn get(
        &self,
        metrics: &Metrics,
        state: &Arc<Mutex<State>>,
        arrived: Instant,
        gzip: bool,
    ) -> std::result::Result<Bytes, String> {
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
                let (m, state, spare) = (metrics.clone(), state.clone(), self.spare.clone());
                let text = tokio::task::spawn_blocking(move || {
                    // A poisoned lock means a panic while mutating; the data
                    // is still the best we have, so keep serving it.
                    let snapshot = state.lock().unwrap_or_else(|e| e.into_inner()).snapshot();
                    let mut buf = spare.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
                    buf.clear();
                    // An empty vector is valid UTF-8, so this cannot fail.
                    let mut text = String::from_utf8(buf).unwrap_or_default();
                    m.render_into(&snapshot, unix_now(), &mut text);
                    text
                })
                .await
                .map_err(|e| e.to_string())?;
                let g = Arc::new(Generation {
                    plain: self.account_reusable(text.into_bytes()),
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
