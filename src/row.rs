//! The rows the exporter writes to SQLite and reads back: the vocabulary
//! shared by the state machine (which produces rows) and the store (which
//! writes them). It sits low in the module graph and uses neither.

/// A row for the database. Times are Unix seconds; they are formatted as
/// ISO-8601 strings on the writer thread, off the hot path.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// Upsert of a bot's current state into `bot_status`.
    BotStatus {
        /// The channel (primary key).
        channel: String,
        /// The current pid.
        pid: u32,
        /// `online`, `stale`, `offline` or `dead`.
        status: &'static str,
        /// The features as a JSON object.
        features_json: String,
        /// When the current process registered.
        registered_at: f64,
        /// The last heartbeat or message.
        last_seen: f64,
    },
    /// One lifecycle event for `bot_events`.
    BotEvent {
        /// When it happened.
        ts: f64,
        /// The channel.
        channel: String,
        /// The pid the event is about.
        pid: u32,
        /// `register`, `unregister`, `restart`, `stale`, `recovered`, `dead`.
        event: &'static str,
        /// Optional free text, e.g. the previous pid of a restart.
        detail: Option<String>,
    },
    /// One LLM call for `llm_usage`.
    LlmUsage {
        /// The row id reserved for it (see `UsageIds`), which its exemplar
        /// names; `None` lets SQLite pick one.
        id: Option<i64>,
        /// When the exporter received it.
        ts: f64,
        /// The channel.
        channel: String,
        /// The model name as sent.
        model: String,
        /// The feature that made the call.
        feature: String,
        /// Prompt tokens.
        tokens_in: u64,
        /// Completion tokens.
        tokens_out: u64,
        /// Latency in milliseconds, if measured.
        latency_ms: Option<f64>,
        /// Cost in USD, if known.
        cost_usd: Option<f64>,
        /// `reported`, `table`, `fallback` (the default price) or `unpriced`.
        cost_source: &'static str,
        /// The sender's pid, if given.
        pid: Option<u32>,
        /// The provider, if given.
        provider: Option<String>,
        /// Cached input tokens.
        tokens_cached: u64,
        /// `ok` or `error`.
        status: &'static str,
        /// Time to first token in milliseconds, if measured.
        ttft_ms: Option<f64>,
        /// Why a failed call failed (`timeout`, `rate_limit`, `auth`,
        /// `server`, `client`, `other`); `None` for a call that succeeded.
        error_type: Option<&'static str>,
    },
    /// One process sample for the legacy `bot_metrics` table.
    BotMetrics {
        /// When it was sampled.
        ts: f64,
        /// The channel.
        channel: String,
        /// The sampled pid.
        pid: u32,
        /// Resident memory in MiB.
        rss_mb: f64,
        /// CPU percent since the previous sample.
        cpu_pct: f64,
        /// The bot's features as a JSON object.
        features_json: String,
    },
}

/// A bot read back from `bot_status` at start-up.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RestoredBot {
    /// The channel.
    pub(crate) channel: String,
    /// The last known pid.
    pub(crate) pid: u32,
    /// The stored status string.
    pub(crate) status: String,
    /// Features parsed from `features_json` (empty if unparsable).
    pub(crate) features: Vec<(String, bool)>,
    /// Registration time, Unix seconds.
    pub(crate) registered_at: f64,
    /// Last seen, Unix seconds.
    pub(crate) last_seen: f64,
}

/// Row ids of `llm_usage` reserved by the writer for the exporter's own
/// rows, handed out at ingest.
///
/// The id of a call's row goes into the exemplar of its latency bucket the
/// moment the call is counted, long before the writer inserts the row, and
/// ingest never waits for the writer. So the exporter picks the id itself:
/// the writer reserves blocks of ids in the database (it moves the table's
/// `AUTOINCREMENT` counter in `sqlite_sequence` past the block, so the bots'
/// own usage logger, which writes to the same table with automatic ids,
/// can never take one), and ingest takes ids from the reserved blocks. When
/// none is left — the writer is behind or the database is down — a call
/// gets no id: its row is inserted with an automatic id, and its exemplar
/// shows the previous call that had one. The lock is held for a few
/// instructions by either side, never across I/O.
#[derive(Debug, Default)]
pub(crate) struct UsageIds {
    blocks: std::sync::Mutex<IdBlocks>,
}

/// The reserved ranges: the one in use and the next one.
#[derive(Debug, Default)]
struct IdBlocks {
    /// The next id to hand out from the current block.
    next: i64,
    /// The end of the current block (exclusive).
    end: i64,
    /// The block to switch to when the current one is used up.
    spare: Option<(i64, i64)>,
    /// The highest id handed out so far, 0 before the first.
    highest: i64,
}

impl UsageIds {
    /// An empty pool: no id until the writer reserves a block.
    pub(crate) fn new() -> UsageIds {
        UsageIds::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IdBlocks> {
        // The data is two ranges updated in single steps; a panic elsewhere
        // cannot leave it half-written.
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next reserved id, or `None` when every reserved id is used.
    pub(crate) fn take(&self) -> Option<i64> {
        let mut b = self.lock();
        if b.next >= b.end {
            let (start, end) = b.spare.take()?;
            b.next = start;
            b.end = end;
        }
        let id = b.next;
        b.next += 1;
        b.highest = b.highest.max(id);
        Some(id)
    }

    /// Whether the writer should reserve another block: there is no spare.
    pub(crate) fn wants_block(&self) -> bool {
        self.lock().spare.is_none()
    }

    /// Adds the reserved block `start..end` (as the spare, or as the current
    /// block when that is used up).
    pub(crate) fn add_block(&self, start: i64, end: i64) {
        let mut b = self.lock();
        if b.next >= b.end {
            b.next = start;
            b.end = end;
        } else {
            b.spare = Some((start, end));
        }
    }

    /// Forgets every reserved block (the writer opened another file, where
    /// they mean nothing) and returns the highest id handed out, which the
    /// next reservation must stay above.
    pub(crate) fn reset(&self) -> i64 {
        let mut b = self.lock();
        b.next = 0;
        b.end = 0;
        b.spare = None;
        b.highest
    }
}

#[cfg(test)]
impl Row {
    /// An `llm_usage` row for tests: one token each way, model `m`, feature
    /// `f`, `reported` when it has a cost and `unpriced` when not.
    pub(crate) fn test_llm_usage(id: Option<i64>, ts: f64, channel: &str, cost_usd: Option<f64>) -> Row {
        Row::LlmUsage {
            id,
            ts,
            channel: channel.to_owned(),
            model: "m".into(),
            feature: "f".into(),
            tokens_in: 1,
            tokens_out: 1,
            latency_ms: None,
            cost_usd,
            cost_source: if cost_usd.is_some() { "reported" } else { "unpriced" },
            pid: None,
            provider: None,
            tokens_cached: 0,
            status: "ok",
            ttft_ms: None,
            error_type: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::UsageIds;

    #[test]
    fn ids_come_from_reserved_blocks_only() {
        let ids = UsageIds::new();
        assert_eq!(ids.take(), None, "nothing reserved yet");
        assert!(ids.wants_block());
        ids.add_block(10, 12);
        assert!(ids.wants_block(), "the first block is the current one");
        ids.add_block(20, 21);
        assert!(!ids.wants_block());
        assert_eq!([ids.take(), ids.take(), ids.take(), ids.take()], [Some(10), Some(11), Some(20), None]);
        assert_eq!(ids.reset(), 20);
        assert_eq!(ids.take(), None, "a reset forgets the blocks");
    }
}
