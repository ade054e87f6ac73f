//! Renders of `/metrics` shared by concurrent scrapes, and the budget of
//! memory that large response bodies may hold.

use std::io::Write as _;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use bytes::Bytes;
use prometheus::IntGauge;
use tracing::debug;

use crate::clock::unix_now;
use crate::metrics::{Format, Metrics};
use crate::state::State;

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

/// One rendering of `/metrics`, shared by every scrape that can use it. It
/// lives as long as some response still sends it, and no longer: the cache
/// keeps only a weak reference, so an idle exporter holds no body.
struct Generation {
    plain: Vec<u8>,
    gzip: std::sync::OnceLock<Vec<u8>>,
    done_at: Instant,
    live: IntGauge,
}

impl Drop for Generation {
    fn drop(&mut self) {
        let gzip = self.gzip.get().map_or(0, Vec::len);
        self.live.sub((self.plain.len() + gzip) as i64);
    }
}

/// Asks the kernel to back a large render buffer with transparent huge
/// pages: a body of tens of megabytes is otherwise filled through thousands
/// of 4 KiB page faults per scrape. Harmless where huge pages are off.
fn advise_huge_pages(buf: &mut String) {
    const HUGE: usize = 2 * 1024 * 1024;
    if buf.capacity() < 2 * HUGE {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        let start = buf.as_mut_ptr() as usize;
        let aligned = start.next_multiple_of(4096);
        let len = (start + buf.capacity()).saturating_sub(aligned) / 4096 * 4096;
        // SAFETY: the range lies inside the buffer's own allocation, which
        // stays alive across the call; MADV_HUGEPAGE only changes how the
        // kernel backs those pages, never their contents or validity.
        unsafe {
            libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
    }
}

/// The plain body of a generation, as a response body.
struct Plain(Arc<Generation>);

impl AsRef<[u8]> for Plain {
    fn as_ref(&self) -> &[u8] {
        &self.0.plain
    }
}

/// The gzip body of a generation (set before this is made).
struct Gzip(Arc<Generation>);

impl AsRef<[u8]> for Gzip {
    fn as_ref(&self) -> &[u8] {
        self.0.gzip.get().map_or(&[], Vec::as_slice)
    }
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
pub(crate) struct ScrapeCache {
    /// The newest render of each format: the text format, then OpenMetrics.
    current: tokio::sync::Mutex<[Weak<Generation>; 2]>,
    live: IntGauge,
    budget: usize,
}

impl ScrapeCache {
    /// An empty cache: bodies count in `live`, at most `budget` bytes.
    pub(crate) fn new(live: IntGauge, budget: usize) -> ScrapeCache {
        ScrapeCache { current: tokio::sync::Mutex::new([Weak::new(), Weak::new()]), live, budget }
    }

    /// Bytes held by large response bodies now.
    pub(crate) fn live_bytes(&self) -> usize {
        usize::try_from(self.live.get()).unwrap_or(0)
    }

    pub(super) fn over_budget(&self, more: usize) -> bool {
        self.live_bytes().saturating_add(more) > self.budget
    }

    /// Wraps a body so it counts in the budget while alive.
    pub(super) fn account(&self, data: Vec<u8>) -> Bytes {
        self.live.add(data.len() as i64);
        Bytes::from_owner(Accounted { data, live: self.live.clone() })
    }

    /// The metrics body in `format` for a scrape that arrived at `arrived`.
    /// Scrapes share renders of their own format only.
    pub(super) async fn get(
        &self,
        metrics: &Metrics,
        state: &Arc<Mutex<State>>,
        arrived: Instant,
        gzip: bool,
        format: Format,
    ) -> std::result::Result<Bytes, String> {
        let mut slots = self.current.lock().await;
        let current = &mut slots[usize::from(format == Format::OpenMetrics)];
        let reuse = match current.upgrade() {
            Some(g) if g.done_at >= arrived => Some(g),
            Some(g) if self.over_budget(g.plain.len()) => {
                debug!(
                    live_bytes = self.live_bytes(),
                    "response memory budget reached; scrape served the newest render"
                );
                Some(g)
            }
            _ => None,
        };
        let generation = match reuse {
            Some(g) => g,
            None => {
                let (m, state) = (metrics.clone(), state.clone());
                let text = tokio::task::spawn_blocking(move || {
                    // A poisoned lock means a panic while mutating; the data
                    // is still the best we have, so keep serving it.
                    let snapshot = state.lock().unwrap_or_else(|e| e.into_inner()).snapshot();
                    let mut text = String::with_capacity(Metrics::size_hint(&snapshot));
                    advise_huge_pages(&mut text);
                    m.render_format_into(format, &snapshot, unix_now(), &mut text);
                    text
                })
                .await
                .map_err(|e| e.to_string())?;
                let plain = text.into_bytes();
                self.live.add(plain.len() as i64);
                let g = Arc::new(Generation {
                    plain,
                    gzip: std::sync::OnceLock::new(),
                    done_at: Instant::now(),
                    live: self.live.clone(),
                });
                *current = Arc::downgrade(&g);
                g
            }
        };
        if !gzip {
            return Ok(Bytes::from_owner(Plain(generation)));
        }
        if generation.gzip.get().is_none() {
            let g = generation.clone();
            let z = tokio::task::spawn_blocking(move || {
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::with_capacity(g.plain.len() / 4), flate2::Compression::fast());
                enc.write_all(&g.plain).and_then(|_| enc.finish())
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            // Only this task sets it: renders and compressions run under the
            // cache's lock, one at a time.
            let len = z.len();
            if generation.gzip.set(z).is_ok() {
                self.live.add(len as i64);
            }
        }
        Ok(Bytes::from_owner(Gzip(generation)))
    }
}
