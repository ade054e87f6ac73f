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
pub struct RestoredBot {
    /// The channel.
    pub channel: String,
    /// The last known pid.
    pub pid: u32,
    /// The stored status string.
    pub status: String,
    /// Features parsed from `features_json` (empty if unparsable).
    pub features: Vec<(String, bool)>,
    /// Registration time, Unix seconds.
    pub registered_at: f64,
    /// Last seen, Unix seconds.
    pub last_seen: f64,
}
