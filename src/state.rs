//! The bot registry and LLM tallies: the in-memory truth behind the metrics.
//!
//! [`State`] is a plain data structure with no I/O and no clock of its own:
//! every operation takes `now` (Unix seconds) and appends the database rows it
//! implies to an output vector. The caller holds the lock only for that, and
//! sends the rows to the writer after releasing it. This keeps the state
//! deterministic and testable with a fake clock.

use std::collections::HashMap;

use prometheus::{IntCounter, IntCounterVec};
use tracing::{info, warn};

use crate::budget::{BudgetLine, Budgets, SpendTracker};
use crate::event::{truncate, ErrorType, Event, LlmUsage, Reason, Rejection, MAX_LABEL_BYTES};
use crate::pricing::PriceTable;
use crate::ratelimit::RateLimitedLog;
use crate::row::{RestoredBot, Row, UsageIds};

/// Upper bounds of the LLM latency histograms (call duration and time to
/// first token), in seconds: LLM calls take from tens of milliseconds
/// (cached, small models) to minutes (long generations).
pub(crate) const LATENCY_BUCKETS: [f64; 14] =
    [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0];

/// A heartbeat updates `bot_status.last_seen` in the database at most this
/// often per bot; state changes are written at once.
pub(crate) const PERSIST_INTERVAL: f64 = 5.0;

/// The label value used when a cardinality limit is reached.
pub(crate) const OVERFLOW_LABEL: &str = "other";

/// The `bot_status.status` of a bot an operator forgot: never restored at
/// start, so a forgotten bot stays forgotten across restarts.
pub(crate) const FORGOTTEN: &str = "forgotten";

/// How long the `bot_status` row of a forgotten bot is kept to be written
/// again should a full queue drop it, in seconds: many ticks, so the drop
/// is seen however the forget and the tick interleave.
const FORGOTTEN_REWRITE_WINDOW: f64 = 60.0;

/// The life-cycle state of a bot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Heartbeats arrive.
    Online,
    /// No heartbeat for the stale-after period.
    Stale,
    /// The bot unregistered cleanly.
    Offline,
    /// The bot's process is gone.
    Dead,
}

impl Status {
    /// Every state, in the order the state-set metric lists them.
    pub(crate) const ALL: [Status; 4] = [Status::Online, Status::Stale, Status::Offline, Status::Dead];

    /// The label and database value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Status::Online => "online",
            Status::Stale => "stale",
            Status::Offline => "offline",
            Status::Dead => "dead",
        }
    }

    /// Parses a stored status; unknown strings are treated as offline.
    pub(crate) fn parse(s: &str) -> Status {
        match s {
            "online" => Status::Online,
            "stale" => Status::Stale,
            "dead" => Status::Dead,
            _ => Status::Offline,
        }
    }
}

/// Whether a bot's pid names a process the exporter can see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Visibility {
    /// Not yet known (e.g. restored from the database, no message since).
    Unknown,
    /// The socket peer that sent the pid is that very process: it lives in
    /// the exporter's pid namespace and can be sampled.
    Local,
    /// The sender is another process or lives in another pid namespace (a
    /// container): the pid means nothing here, so it is never sampled and
    /// liveness rests on heartbeats alone.
    Foreign,
}

impl Visibility {
    /// Classifies a message's pid by the peer credentials of its connection.
    pub(crate) fn from_peer(peer_pid: u32, pid: u32) -> Visibility {
        if peer_pid == pid {
            Visibility::Local
        } else {
            Visibility::Foreign
        }
    }
}

/// The last sample of a bot's process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ProcessInfo {
    /// False once the process is gone, a zombie, or its pid was reused.
    pub(crate) alive: bool,
    /// CPU seconds (user + system) of the current process.
    pub(crate) cpu_seconds: f64,
    /// CPU percent between the last two samples (100 is one core).
    pub(crate) cpu_percent: f64,
    /// Resident memory in bytes.
    pub(crate) rss_bytes: u64,
    /// Virtual memory in bytes.
    pub(crate) vms_bytes: u64,
    /// Process start time, Unix seconds; identifies the process across pid reuse.
    pub(crate) start_time: u64,
}

/// What the sampler found for one pid.
#[derive(Debug, Clone, PartialEq)]
pub enum SampleResult {
    /// The process runs.
    Alive {
        /// CPU seconds used so far.
        cpu_seconds: f64,
        /// CPU percent since the previous sample (as the legacy monitor stored it).
        cpu_pct: f64,
        /// Resident memory in bytes.
        rss_bytes: u64,
        /// Virtual memory in bytes.
        vms_bytes: u64,
        /// Start time, Unix seconds.
        start_time: u64,
    },
    /// The process is gone or a zombie; the text says which.
    Gone(&'static str),
}

/// One sampled bot.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The channel.
    pub channel: String,
    /// The pid that was sampled.
    pub pid: u32,
    /// What was found.
    pub result: SampleResult,
}

/// One tracked bot.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Bot {
    /// The channel, the bot's identity.
    pub(crate) channel: String,
    /// The current process id.
    pub(crate) pid: u32,
    /// The current state.
    pub(crate) status: Status,
    /// Features and whether they are enabled, sorted by name.
    pub(crate) features: Vec<(String, bool)>,
    /// When the current process registered (or was first seen).
    pub(crate) registered_at: f64,
    /// The last heartbeat or register.
    pub(crate) last_heartbeat: f64,
    /// When the bot entered its current state.
    pub(crate) status_since: f64,
    /// Heartbeats received since the exporter started tracking the bot.
    pub(crate) heartbeats: u64,
    /// Restarts (new pid for the same channel) seen by the exporter.
    pub(crate) restarts: u64,
    /// Whether the pid can be sampled.
    pub(crate) visibility: Visibility,
    /// The last process sample, once sampled.
    pub(crate) process: Option<ProcessInfo>,
    /// CPU seconds of this bot's earlier processes, so that its CPU counter
    /// never goes backwards across restarts while the bot is tracked.
    cpu_base: f64,
    /// When `bot_status` was last written for this bot.
    persisted_at: f64,
    /// Whether `bot_status` is behind the in-memory state.
    dirty: bool,
}

/// Counters of one (channel, model, feature) combination.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LlmSeries {
    /// Calls.
    pub(crate) requests: u64,
    /// Prompt tokens.
    pub(crate) input_tokens: u64,
    /// Completion tokens.
    pub(crate) output_tokens: u64,
    /// USD by where it came from, indexed like [`crate::pricing::CostSource::LABELS`]
    /// (reported, table, fallback); `None` until a call of that source, so
    /// only the sources a series has used are rendered.
    pub(crate) cost_usd: [Option<f64>; 3],
    /// Calls priced neither by the sender nor by a table entry, whether or
    /// not the default price was applied.
    pub(crate) unpriced: u64,
    /// Calls the sender reported as failed, by error type, indexed like
    /// [`ErrorType::ALL`].
    pub(crate) errors: [u64; ErrorType::ALL.len()],
    /// Input tokens served from cache (part of `input_tokens`).
    pub(crate) cached_tokens: u64,
    /// When the series last changed, for expiry.
    pub(crate) updated_at: f64,
}

/// A latency histogram of one (channel, model) pair.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Latency {
    /// Non-cumulative counts per bucket of [`LATENCY_BUCKETS`]; the last slot is +Inf.
    pub(crate) buckets: [u64; LATENCY_BUCKETS.len() + 1],
    /// Sum of observations in seconds.
    pub(crate) sum: f64,
    /// Number of observations.
    pub(crate) count: u64,
    /// The latest observation that names its call, shown in OpenMetrics on
    /// the bucket it fell in.
    pub(crate) exemplar: Option<Exemplar>,
}

/// What an exemplar names: the call's row or the sender's trace.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ExemplarLabel {
    /// The `id` of the call's row in `llm_usage`.
    UsageId(i64),
    /// The `trace_id` the bot sent with the call.
    TraceId(String),
}

/// One observation shown as an OpenMetrics exemplar.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Exemplar {
    /// The index in [`Latency::buckets`] the observation fell in.
    pub(crate) bucket: usize,
    /// The call it names.
    pub(crate) label: ExemplarLabel,
    /// The observed latency in seconds.
    pub(crate) value: f64,
    /// When the exporter received the call, Unix seconds.
    pub(crate) timestamp: f64,
}

/// The value of `key` in `map`, created empty when missing; the key is
/// cloned only then, because `entry` would take an owned key on every call.
/// (Always `Some`: `get_mut` right after the insert.)
fn slot<'a, K: std::hash::Hash + Eq + Clone, V: Default>(map: &'a mut HashMap<K, V>, key: &K) -> Option<&'a mut V> {
    if !map.contains_key(key) {
        map.insert(key.clone(), V::default());
    }
    map.get_mut(key)
}

impl Latency {
    fn observe(&mut self, seconds: f64, label: Option<ExemplarLabel>, now: f64) {
        let i = LATENCY_BUCKETS.iter().position(|b| seconds <= *b).unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i] += 1;
        self.sum += seconds;
        self.count += 1;
        // A call that names nothing leaves the previous exemplar: it still
        // names a real call of its bucket, which is better than none.
        if let Some(label) = label {
            self.exemplar = Some(Exemplar { bucket: i, label, value: seconds, timestamp: now });
        }
    }
}

/// A point-in-time copy of the state for rendering; see [`State::snapshot`].
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The tracked bots.
    pub(crate) bots: Vec<Bot>,
    /// The LLM series.
    pub(crate) llm: Vec<(LlmKey, LlmSeries)>,
    /// The latency histograms by (channel, model).
    pub(crate) latencies: Vec<((String, String), Latency)>,
    /// The time-to-first-token histograms by (channel, model).
    pub(crate) ttfts: Vec<((String, String), Latency)>,
    /// The bots with a budget and their spend; empty without `--budgets.file`.
    pub(crate) budgets: Vec<BudgetLine>,
}

/// Key of an LLM series.
pub(crate) type LlmKey = (String, String, String);

/// Settings of the state machine.
#[derive(Debug, Clone)]
pub struct StateConfig {
    /// Seconds without heartbeat before a bot is stale.
    pub stale_after: f64,
    /// Seconds an offline (cleanly unregistered) bot keeps its series. Dead
    /// and stale bots keep theirs until they come back, unregister, are
    /// forgotten by an operator or evicted for a new bot.
    pub expiry: f64,
    /// Most bots tracked at once. At the limit a new bot takes the place of
    /// the offline, else the dead or stale, bot that has been so longest;
    /// only when every bot is online is it refused.
    pub max_bots: usize,
    /// Most (channel, model, feature) series at once.
    pub max_llm_series: usize,
    /// Most features kept per bot; the rest of a register's features are
    /// dropped and counted.
    pub max_features_per_bot: usize,
}

/// Counters the state bumps itself when a cardinality limit is hit.
#[derive(Debug, Clone)]
pub struct OverflowCounters {
    /// New bots refused because `max_bots` is reached and every bot is online.
    pub channel: IntCounter,
    /// Bots evicted to make room for a new bot at `max_bots`, by the status
    /// they had (`offline`, `stale`, `dead`).
    pub evicted: IntCounterVec,
    /// LLM calls folded into the `other` series.
    pub llm_series: IntCounter,
    /// Model or feature names cut to the label length limit.
    pub length: IntCounter,
    /// Features dropped because a bot sent more than the limit.
    pub features: IntCounter,
}

/// The registry of bots and LLM tallies.
#[derive(Debug)]
pub struct State {
    config: StateConfig,
    pricing: PriceTable,
    overflow: OverflowCounters,
    bots: HashMap<String, Bot>,
    llm: HashMap<LlmKey, LlmSeries>,
    latency: HashMap<(String, String), Latency>,
    ttft: HashMap<(String, String), Latency>,
    /// Rows produced off the ingest path (by the sampler), sent at the next tick.
    pending: Vec<Row>,
    /// Rate limit for the warning about too many features.
    features_log: RateLimitedLog,
    /// Where `llm_usage` row ids come from; none without a store (tests).
    usage_ids: Option<std::sync::Arc<UsageIds>>,
    /// Budgets and spend per bot, with `--budgets.file` only.
    budgets: Option<SpendTracker>,
    /// False once a search for a bot to evict found none, until a bot
    /// leaves the online state again: at the bot limit with every bot
    /// online, a flood of new channels then costs no search per line.
    evictable: bool,
    /// The `bot_status` rows of recently forgotten bots, with when they were
    /// last sent (`None`: queued again, sent at the next tick): the bots are
    /// gone from `bots`, so this is where [`State::mark_unwritten`] finds a
    /// dropped one to write again.
    forgotten: HashMap<String, (Option<f64>, Row)>,
}

/// What [`State::forget`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Forget {
    /// The bot was forgotten; it had this status.
    Forgotten(Status),
    /// No bot of that channel is tracked.
    Unknown,
    /// The bot is online: its next heartbeat would register it again, so it
    /// is not forgotten (it should unregister, or be stopped first).
    Online,
}

fn features_json(features: &[(String, bool)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> =
        features.iter().map(|(k, v)| (k.clone(), serde_json::Value::Bool(*v))).collect();
    serde_json::Value::Object(map).to_string()
}

impl Bot {
    /// A bot that is online, last seen at `last_seen`, not yet written.
    fn new(channel: String, pid: u32, features: Vec<(String, bool)>, registered_at: f64, last_seen: f64) -> Bot {
        Bot {
            channel,
            pid,
            status: Status::Online,
            features,
            registered_at,
            last_heartbeat: last_seen,
            status_since: last_seen,
            heartbeats: 0,
            restarts: 0,
            visibility: Visibility::Unknown,
            process: None,
            cpu_base: 0.0,
            persisted_at: last_seen,
            dirty: true,
        }
    }

    fn status_row(&mut self, now: f64) -> Row {
        self.status_row_saying(now, self.status.as_str())
    }

    /// The bot's `bot_status` row with `status` in place of its own (for a
    /// forgotten bot).
    fn status_row_saying(&mut self, now: f64, status: &'static str) -> Row {
        self.persisted_at = now;
        self.dirty = false;
        Row::BotStatus {
            channel: self.channel.clone(),
            pid: self.pid,
            status,
            features_json: features_json(&self.features),
            registered_at: self.registered_at,
            last_seen: self.last_heartbeat,
        }
    }

    fn event_row(&self, now: f64, event: &'static str, detail: Option<String>) -> Row {
        Row::BotEvent { ts: now, channel: self.channel.clone(), pid: self.pid, event, detail }
    }

    /// Records who sent the bot's latest message: the pid can be sampled
    /// only if the sender is that very process. No peer information (e.g.
    /// a direct call) leaves the verdict as it was.
    fn saw_peer(&mut self, peer_pid: Option<u32>) {
        if let Some(peer) = peer_pid {
            self.visibility = Visibility::from_peer(peer, self.pid);
        }
    }

    fn set_status(&mut self, status: Status, now: f64) {
        if self.status != status {
            self.status = status;
            self.status_since = now;
        }
    }
}

impl State {
    /// An empty registry.
    pub fn new(config: StateConfig, pricing: PriceTable, overflow: OverflowCounters) -> State {
        State {
            config,
            pricing,
            overflow,
            bots: HashMap::new(),
            llm: HashMap::new(),
            latency: HashMap::new(),
            ttft: HashMap::new(),
            pending: Vec::new(),
            features_log: RateLimitedLog::new(std::time::Duration::from_secs(10)),
            usage_ids: None,
            budgets: None,
            evictable: false,
            forgotten: HashMap::new(),
        }
    }

    /// Takes `llm_usage` row ids from `ids` from now on, so that each call's
    /// row id is known at ingest and can name the call in its exemplar.
    pub(crate) fn set_usage_ids(&mut self, ids: std::sync::Arc<UsageIds>) {
        self.usage_ids = Some(ids);
    }

    /// Forgets the exemplars that name the `llm_usage` rows of `dropped`
    /// (channel, model, row id): rows a full queue dropped were never
    /// written, and an exemplar must not lead to a row that does not exist.
    /// The bucket shows no exemplar until its next call. A call's exemplar
    /// is on its own (channel, model) histogram or, beyond the series limit,
    /// on the overflow one; a later call that was written keeps its own.
    pub(crate) fn forget_exemplars(&mut self, dropped: Vec<(String, String, i64)>) {
        let names_dropped = |h: &Latency, ids: &[i64]| {
            h.exemplar
                .as_ref()
                .is_some_and(|e| matches!(e.label, ExemplarLabel::UsageId(id) if ids.binary_search(&id).is_ok()))
        };
        // Under overload most calls of a read are dropped: one pass over the
        // histograms then costs less than two lookups per call.
        if dropped.len() * 2 > self.latency.len() {
            let mut ids: Vec<i64> = dropped.into_iter().map(|(_, _, id)| id).collect();
            ids.sort_unstable();
            for h in self.latency.values_mut().filter(|h| names_dropped(h, &ids)) {
                h.exemplar = None;
            }
            return;
        }
        let overflow = (OVERFLOW_LABEL.to_owned(), OVERFLOW_LABEL.to_owned());
        for (channel, model, id) in dropped {
            let own = (channel, model);
            for key in [&own, &overflow] {
                if let Some(h) = self.latency.get_mut(key).filter(|h| names_dropped(h, &[id])) {
                    h.exemplar = None;
                }
            }
        }
    }

    /// Re-creates bots read back from the database at start-up, so their
    /// series continue. A bot that was online, stale or dead is restored
    /// however long ago it was last seen: it never unregistered, so it may be
    /// down and must keep paging (an online one goes stale at the next tick
    /// if it died while the exporter was down). An offline bot is restored
    /// only within the expiry, as long as its series would have lived; a
    /// forgotten one never. Beyond `max_bots` the most recently seen win.
    pub(crate) fn restore(&mut self, mut bots: Vec<RestoredBot>, now: f64) -> usize {
        let expiry = self.config.expiry;
        bots.retain(|b| {
            b.status != FORGOTTEN && (Status::parse(&b.status) != Status::Offline || now - b.last_seen <= expiry)
        });
        bots.sort_by(|a, b| b.last_seen.total_cmp(&a.last_seen).then_with(|| a.channel.cmp(&b.channel)));
        let room = self.config.max_bots.saturating_sub(self.bots.len());
        if bots.len() > room {
            warn!(
                restorable = bots.len(),
                limit = self.config.max_bots,
                left_out = bots.len() - room,
                "more bots to restore than --limits.max-bots; the most recently seen are restored"
            );
            bots.truncate(room);
        }
        let mut restored = 0;
        for b in bots {
            let mut features = b.features;
            features.truncate(self.config.max_features_per_bot);
            features.shrink_to_fit();
            let mut bot = Bot::new(b.channel, b.pid, features, b.registered_at, b.last_seen);
            bot.status = Status::parse(&b.status);
            self.evictable |= bot.status != Status::Online;
            // The database already says all this.
            bot.persisted_at = now;
            bot.dirty = false;
            self.bots.insert(bot.channel.clone(), bot);
            restored += 1;
        }
        restored
    }

    /// Forgets a bot an operator says is gone for good: its series end (and
    /// with them its alerts), a `forgotten` event is written, and its
    /// `bot_status` row says `forgotten` so that no restart restores it.
    /// History rows stay. An online bot is not forgotten: its next heartbeat
    /// would bring it straight back. A forgotten bot that sends again is a
    /// new bot. The rows go out with the next tick (the caller, an HTTP
    /// handler, holds no queue sender, so that it can never hold up the
    /// writer's shutdown).
    pub(crate) fn forget(&mut self, channel: &str, now: f64) -> Forget {
        match self.bots.get(channel).map(|b| b.status) {
            None => return Forget::Unknown,
            Some(Status::Online) => return Forget::Online,
            Some(_) => {}
        }
        let Some(mut bot) = self.remove_bot(channel) else { return Forget::Unknown };
        info!(
            channel = %bot.channel,
            pid = bot.pid,
            was = bot.status.as_str(),
            "bot forgotten by an operator; its series and alerts end"
        );
        self.pending.push(bot.event_row(
            now,
            "forgotten",
            Some(format!("was {}; by an operator", bot.status.as_str())),
        ));
        let row = bot.status_row_saying(now, FORGOTTEN);
        // Bounded like the bots themselves; at the bound the oldest entry
        // goes, which at worst lets one restart restore a forgotten bot.
        if self.forgotten.len() >= self.config.max_bots {
            let oldest = self
                .forgotten
                .iter()
                .min_by(|a, b| {
                    let sent = |e: &(Option<f64>, Row)| e.0.unwrap_or(f64::INFINITY);
                    sent(a.1).total_cmp(&sent(b.1))
                })
                .map(|(c, _)| c.clone());
            if let Some(c) = oldest {
                self.forgotten.remove(&c);
            }
        }
        self.forgotten.insert(bot.channel.clone(), (None, row.clone()));
        self.pending.push(row);
        Forget::Forgotten(bot.status)
    }

    /// Applies one event. Database rows it implies are appended to `out`.
    /// `peer_pid` is the pid of the process on the other end of the socket,
    /// when the kernel tells it; it decides whether the bot can be sampled.
    pub fn apply(
        &mut self,
        event: Event,
        now: f64,
        peer_pid: Option<u32>,
        out: &mut Vec<Row>,
    ) -> Result<(), Rejection> {
        match event {
            Event::Register { channel, pid, features } => {
                self.register(channel, pid, Some(features), now, peer_pid, out)
            }
            Event::Heartbeat { channel, pid } => self.heartbeat(channel, pid, now, peer_pid, out),
            Event::Unregister { channel, pid } => self.unregister(channel, pid, now, out),
            Event::LlmUsage(usage) => {
                self.llm_usage(usage, now, out);
                Ok(())
            }
        }
    }

    fn new_bot(
        &mut self,
        channel: String,
        pid: u32,
        features: Vec<(String, bool)>,
        now: f64,
        out: &mut Vec<Row>,
    ) -> Result<&mut Bot, Rejection> {
        if self.bots.len() >= self.config.max_bots && !self.evict_one(now, out) {
            self.overflow.channel.inc();
            return Err(Rejection::new(
                Reason::TooManyBots,
                format!("bot limit {} reached and every bot is online; channel not tracked", self.config.max_bots),
            ));
        }
        // A forgotten channel that sends again is a bot again: its own
        // status rows win over the forgotten one, even one not yet sent.
        if self.forgotten.remove(&channel).is_some() {
            self.pending.retain(
                |r| !matches!(r, Row::BotStatus { channel: c, status, .. } if *c == channel && *status == FORGOTTEN),
            );
        }
        let bot = Bot::new(channel.clone(), pid, features, now, now);
        Ok(self.bots.entry(channel).or_insert(bot))
    }

    /// Stops tracking a bot. Its spend series stay until the month ends, so
    /// that spend sums do not fall; its LLM series expire on their own.
    fn remove_bot(&mut self, channel: &str) -> Option<Bot> {
        let bot = self.bots.remove(channel)?;
        if let Some(b) = self.budgets.as_mut() {
            b.bot_gone(channel);
        }
        Some(bot)
    }

    /// Makes room for a new bot at the bot limit by evicting the bot that
    /// has been offline longest, or else the one that has been dead or stale
    /// longest; false when every bot is online. Dead and stale bots never
    /// expire, so without this a fleet's crashed bots would fill the limit
    /// and lock new bots out. The eviction is counted, logged and written to
    /// `bot_events`; the bot's `bot_status` row keeps its real state.
    fn evict_one(&mut self, now: f64, out: &mut Vec<Row>) -> bool {
        if !self.evictable {
            return false;
        }
        // Offline bots first: they page nobody and would expire anyway.
        let order = |s: Status| u8::from(s != Status::Offline);
        let victim = self
            .bots
            .values()
            .filter(|b| b.status != Status::Online)
            .min_by(|a, b| {
                order(a.status)
                    .cmp(&order(b.status))
                    .then(a.status_since.total_cmp(&b.status_since))
                    .then_with(|| a.channel.cmp(&b.channel))
            })
            .map(|b| b.channel.clone());
        let Some(mut bot) = victim.and_then(|c| self.remove_bot(&c)) else {
            self.evictable = false;
            return false;
        };
        let status = bot.status.as_str();
        self.overflow.evicted.with_label_values(&[status]).inc();
        let seconds = (now - bot.status_since).max(0.0).round();
        if bot.status == Status::Offline {
            info!(channel = %bot.channel, pid = bot.pid, status, seconds, "offline bot evicted early for a new bot");
        } else {
            warn!(
                channel = %bot.channel,
                pid = bot.pid,
                status,
                seconds,
                limit = self.config.max_bots,
                "bot evicted for a new bot at --limits.max-bots; its series and alerts end"
            );
        }
        if bot.dirty {
            out.push(bot.status_row(now));
        }
        let detail = format!("was {status} for {seconds:.0}s; bot limit {} reached", self.config.max_bots);
        out.push(bot.event_row(now, "evicted", Some(detail)));
        true
    }

    fn register(
        &mut self,
        channel: String,
        pid: u32,
        features: Option<Vec<(String, bool)>>,
        now: f64,
        peer_pid: Option<u32>,
        out: &mut Vec<Row>,
    ) -> Result<(), Rejection> {
        let implicit = features.is_none();
        let features = features.map(|f| self.limit_features(&channel, f));
        if let Some(bot) = self.bots.get_mut(&channel) {
            let previous = bot.status;
            if bot.pid != pid {
                let old = bot.pid;
                bot.restarts += 1;
                bot.pid = pid;
                bot.registered_at = now;
                bot.cpu_base += bot.process.map_or(0.0, |p| p.cpu_seconds);
                bot.process = None;
                bot.visibility = Visibility::Unknown;
                info!(channel = %bot.channel, pid, previous_pid = old, restarts = bot.restarts, "bot restarted");
                out.push(bot.event_row(now, "restart", Some(format!("previous pid {old}"))));
            } else if implicit && previous != Status::Online {
                info!(channel = %bot.channel, pid, from = previous.as_str(), "bot recovered");
                out.push(bot.event_row(now, "recovered", Some(format!("was {}", previous.as_str()))));
            } else if !implicit {
                if previous != Status::Online {
                    info!(channel = %bot.channel, pid, "bot registered");
                }
                out.push(bot.event_row(now, "register", None));
            }
            if let Some(f) = features {
                bot.features = f;
            }
            if implicit {
                bot.heartbeats += 1;
            }
            bot.last_heartbeat = now;
            bot.set_status(Status::Online, now);
            bot.saw_peer(peer_pid);
            // Plain heartbeats never get here (see `heartbeat`): this is a
            // state change, worth writing at once.
            out.push(bot.status_row(now));
            return Ok(());
        }
        let bot = self.new_bot(channel, pid, features.unwrap_or_default(), now, out)?;
        bot.saw_peer(peer_pid);
        if implicit {
            bot.heartbeats += 1;
            info!(channel = %bot.channel, pid, "bot registered implicitly by heartbeat");
        } else {
            info!(channel = %bot.channel, pid, "bot registered");
        }
        out.push(bot.event_row(now, "register", implicit.then(|| "implicit, by heartbeat".to_owned())));
        out.push(bot.status_row(now));
        Ok(())
    }

    /// Keeps at most `max_features_per_bot` features (the first by name):
    /// every feature is a series, so a bot must not be able to send
    /// thousands. The dropped ones are counted and logged (rate-limited).
    fn limit_features(&mut self, channel: &str, mut features: Vec<(String, bool)>) -> Vec<(String, bool)> {
        let max = self.config.max_features_per_bot;
        if features.len() > max {
            let dropped = features.len() - max;
            features.truncate(max);
            // Truncating keeps the allocation: give back the capacity of the
            // thousands of entries a hostile register may have sent.
            features.shrink_to_fit();
            self.overflow.features.inc_by(dropped as u64);
            if let Some(suppressed) = self.features_log.allow() {
                warn!(
                    channel = %channel,
                    reason = "too_many_features",
                    kept = max,
                    dropped,
                    suppressed,
                    "register sent more features than --limits.max-features-per-bot; the rest are ignored"
                );
            }
        }
        features
    }

    /// Marks bots whose last `bot_status` row never reached the database
    /// (dropped from a full queue), so the next [`State::tick`] or
    /// [`State::flush`] writes their current state again.
    pub(crate) fn mark_unwritten(&mut self, channels: Vec<String>) {
        for channel in channels {
            if let Some(bot) = self.bots.get_mut(&channel) {
                bot.dirty = true;
                bot.persisted_at = f64::NEG_INFINITY;
            } else if let Some((sent, row)) = self.forgotten.get_mut(&channel) {
                // A forgotten bot has no state to write but that row.
                *sent = None;
                self.pending.push(row.clone());
            }
        }
    }

    fn heartbeat(
        &mut self,
        channel: String,
        pid: u32,
        now: f64,
        peer_pid: Option<u32>,
        out: &mut Vec<Row>,
    ) -> Result<(), Rejection> {
        // The fast path: a known bot, same pid, already online. Nothing to
        // write now; the ticker persists `last_seen` every few seconds.
        if let Some(bot) = self.bots.get_mut(&channel) {
            if bot.pid == pid && bot.status == Status::Online {
                bot.heartbeats += 1;
                bot.last_heartbeat = now;
                bot.dirty = true;
                bot.saw_peer(peer_pid);
                return Ok(());
            }
        }
        self.register(channel, pid, None, now, peer_pid, out)
    }

    fn unregister(&mut self, channel: String, pid: u32, now: f64, out: &mut Vec<Row>) -> Result<(), Rejection> {
        let Some(bot) = self.bots.get_mut(&channel) else {
            // Unknown bot: keep the audit trail, track nothing.
            out.push(Row::BotEvent { ts: now, channel, pid, event: "unregister", detail: Some("unknown bot".into()) });
            return Ok(());
        };
        if bot.pid != pid {
            return Err(Rejection::new(
                Reason::PidMismatch,
                format!("unregister for pid {pid} but channel {:?} runs pid {}", bot.channel, bot.pid),
            ));
        }
        bot.last_heartbeat = now;
        bot.set_status(Status::Offline, now);
        self.evictable = true;
        info!(channel = %bot.channel, pid, "bot offline (unregistered)");
        out.push(bot.event_row(now, "unregister", None));
        out.push(bot.status_row(now));
        Ok(())
    }

    fn llm_usage(&mut self, u: LlmUsage, now: f64, out: &mut Vec<Row>) {
        let (cost, source) =
            self.pricing.cost(&u.model, u.tokens_in, u.tokens_cached, u.tokens_out, u.reported_cost_usd);
        if u.truncated {
            self.overflow.length.inc();
        }
        // Names longer than a label may be are cut in the series key only;
        // the row keeps them whole. Such names are rare, so only they cost
        // an allocation here.
        let (model, feature, whole) = if u.truncated {
            let model = truncate(&u.model, MAX_LABEL_BYTES).to_owned();
            let feature = truncate(&u.feature, MAX_LABEL_BYTES).to_owned();
            (model, feature, Some((u.model, u.feature)))
        } else {
            (u.model, u.feature, None)
        };
        // This runs for every call, so the call's own strings serve as the
        // map keys and end up in its row: a known series costs lookups and
        // no allocation, and only a new one clones its key.
        let mut key = (u.channel, model, feature);
        // The call's names when it is counted in the overflow series.
        let mut own = None;
        if !self.llm.contains_key(&key) && self.llm.len() >= self.config.max_llm_series {
            self.overflow.llm_series.inc();
            let other = (OVERFLOW_LABEL.to_owned(), OVERFLOW_LABEL.to_owned(), OVERFLOW_LABEL.to_owned());
            own = Some(std::mem::replace(&mut key, other));
        }
        if let Some(series) = slot(&mut self.llm, &key) {
            series.requests += 1;
            series.input_tokens += u.tokens_in;
            series.output_tokens += u.tokens_out;
            // The cost_source label is a closed set of three, so a series key
            // has at most three cost series, and the overflow key keeps them.
            let slot = &mut series.cost_usd[source.label_index()];
            *slot = Some(slot.unwrap_or(0.0) + cost.unwrap_or(0.0));
            series.unpriced += u64::from(source.is_unpriced());
            if let Some(t) = u.error_type {
                series.errors[t as usize] += 1;
            }
            series.cached_tokens += u.tokens_cached;
            series.updated_at = now;
        }
        if let Some(b) = self.budgets.as_mut() {
            let bots = &self.bots;
            let channel = own.as_ref().map_or(&key.0, |o: &(String, String, String)| &o.0);
            b.add(channel, cost.unwrap_or(0.0), now, |c| bots.contains_key(c));
        }
        let id = self.usage_ids.as_ref().and_then(|ids| ids.take());
        // The histograms follow their series into `other`, so the two stay
        // consistent and histogram keys never outnumber series keys. Their
        // key is (channel, model), lent from `key` and given back.
        let histogram_key = (std::mem::take(&mut key.0), std::mem::take(&mut key.1));
        if let Some(ms) = u.latency_ms {
            // A trace id is what the bot's own tracing knows the call by, so
            // it wins over the row id when the bot sent one.
            let label = match (u.trace_id, id) {
                (Some(t), _) => Some(ExemplarLabel::TraceId(t)),
                (None, Some(id)) => Some(ExemplarLabel::UsageId(id)),
                (None, None) => None,
            };
            if let Some(h) = slot(&mut self.latency, &histogram_key) {
                h.observe(ms / 1000.0, label, now);
            }
        }
        if let Some(ms) = u.ttft_ms {
            if let Some(h) = slot(&mut self.ttft, &histogram_key) {
                h.observe(ms / 1000.0, None, now);
            }
        }
        (key.0, key.1) = histogram_key;
        let (channel, model, feature) = match (own.unwrap_or(key), whole) {
            ((channel, _, _), Some((model, feature))) => (channel, model, feature),
            (names, None) => names,
        };
        out.push(Row::LlmUsage {
            id,
            ts: now,
            channel,
            model,
            feature,
            tokens_in: u.tokens_in,
            tokens_out: u.tokens_out,
            latency_ms: u.latency_ms,
            cost_usd: cost,
            cost_source: source.as_str(),
            pid: u.pid,
            provider: u.provider,
            tokens_cached: u.tokens_cached,
            status: if u.error { "error" } else { "ok" },
            ttft_ms: u.ttft_ms,
            error_type: u.error_type.map(ErrorType::as_str),
        });
    }

    /// Periodic work: marks silent bots stale, writes coalesced heartbeats,
    /// and forgets bots and series past their expiry.
    pub fn tick(&mut self, now: f64, out: &mut Vec<Row>) {
        out.append(&mut self.pending);
        if let Some(b) = self.budgets.as_mut() {
            let bots = &self.bots;
            b.roll(now, |c| bots.contains_key(c));
        }
        let stale_after = self.config.stale_after;
        let expiry = self.config.expiry;
        // Rows queued again by `mark_unwritten` go out with this tick.
        self.forgotten.retain(|_, (sent, _)| now - *sent.get_or_insert(now) <= FORGOTTEN_REWRITE_WINDOW);
        let mut expired = Vec::new();
        for bot in self.bots.values_mut() {
            if bot.status == Status::Online && now - bot.last_heartbeat > stale_after {
                bot.set_status(Status::Stale, now);
                self.evictable = true;
                warn!(
                    channel = %bot.channel,
                    pid = bot.pid,
                    silent_seconds = (now - bot.last_heartbeat).round(),
                    "bot stale: no heartbeat"
                );
                out.push(bot.event_row(
                    now,
                    "stale",
                    Some(format!("no heartbeat for {:.0}s", now - bot.last_heartbeat)),
                ));
                out.push(bot.status_row(now));
            } else if bot.dirty && now - bot.persisted_at >= PERSIST_INTERVAL {
                out.push(bot.status_row(now));
            }
            // An offline bot keeps its series for the expiry period so
            // dashboards see what happened. A dead or stale bot crashed or
            // hung without unregistering: it keeps its series — and its
            // alerts keep firing — until it comes back, unregisters, or is
            // forgotten or evicted (see `forget` and `evict_one`).
            if bot.status == Status::Offline && now - bot.status_since > expiry {
                expired.push(bot.channel.clone());
            }
        }
        for channel in &expired {
            self.remove_bot(channel);
            info!(channel = %channel, "bot series expired");
        }
        let bots = &self.bots;
        let before = self.llm.len();
        self.llm.retain(|(c, _, _), s| bots.contains_key(c) || now - s.updated_at <= expiry);
        if self.llm.len() != before {
            // A histogram lives as long as some series of its (channel, model).
            let live: std::collections::HashSet<(&str, &str)> =
                self.llm.keys().map(|(c, m, _)| (c.as_str(), m.as_str())).collect();
            self.latency.retain(|(c, m), _| live.contains(&(c.as_str(), m.as_str())));
            self.ttft.retain(|(c, m), _| live.contains(&(c.as_str(), m.as_str())));
        }
    }

    /// The bots the sampler should look at: visible pids of bots that are
    /// not offline (they exited cleanly) or already dead.
    pub(crate) fn sample_targets(&self) -> Vec<(String, u32)> {
        self.bots
            .values()
            .filter(|b| b.visibility == Visibility::Local && matches!(b.status, Status::Online | Status::Stale))
            .map(|b| (b.channel.clone(), b.pid))
            .collect()
    }

    /// Applies a sampler pass: updates process figures, queues `bot_metrics`
    /// rows, and declares bots whose process is gone (or whose pid now names
    /// a different process) dead, even if their last heartbeat was recent.
    pub fn record_samples(&mut self, samples: Vec<Sample>, now: f64) {
        for s in samples {
            let Some(bot) = self.bots.get_mut(&s.channel) else { continue };
            // The bot restarted or went offline while the sampler ran.
            if bot.pid != s.pid || !matches!(bot.status, Status::Online | Status::Stale) {
                continue;
            }
            let gone = match s.result {
                SampleResult::Alive { start_time, .. } if bot.process.is_some_and(|p| p.start_time != start_time) => {
                    Some("pid reused by another process")
                }
                SampleResult::Alive { cpu_seconds, cpu_pct, rss_bytes, vms_bytes, start_time } => {
                    bot.process = Some(ProcessInfo {
                        alive: true,
                        cpu_seconds,
                        cpu_percent: cpu_pct,
                        rss_bytes,
                        vms_bytes,
                        start_time,
                    });
                    self.pending.push(Row::BotMetrics {
                        ts: now,
                        channel: bot.channel.clone(),
                        pid: bot.pid,
                        rss_mb: rss_bytes as f64 / (1024.0 * 1024.0),
                        cpu_pct,
                        features_json: features_json(&bot.features),
                    });
                    None
                }
                SampleResult::Gone(why) => Some(why),
            };
            if let Some(why) = gone {
                if let Some(p) = bot.process.as_mut() {
                    p.alive = false;
                    p.cpu_percent = 0.0;
                } else {
                    bot.process = Some(ProcessInfo {
                        alive: false,
                        cpu_seconds: 0.0,
                        cpu_percent: 0.0,
                        rss_bytes: 0,
                        vms_bytes: 0,
                        start_time: 0,
                    });
                }
                bot.set_status(Status::Dead, now);
                self.evictable = true;
                warn!(channel = %bot.channel, pid = bot.pid, reason = why, "bot dead: process gone");
                self.pending.push(bot.event_row(now, "dead", Some(why.to_owned())));
                // Written by the next tick from the bot's state then, not
                // queued now: a register before that tick must not be
                // overwritten by a `dead` row from before it.
                bot.dirty = true;
                bot.persisted_at = f64::NEG_INFINITY;
            }
        }
    }

    /// Writes every bot whose `last_seen` is behind, regardless of the
    /// coalescing interval. Used at shutdown so nothing is lost.
    pub(crate) fn flush(&mut self, now: f64, out: &mut Vec<Row>) {
        out.append(&mut self.pending);
        for bot in self.bots.values_mut().filter(|b| b.dirty) {
            out.push(bot.status_row(now));
        }
    }

    /// A copy of everything the metrics show, taken under the lock so that
    /// formatting hundreds of thousands of lines happens after it is
    /// released and never stalls ingest.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            bots: self.bots.values().cloned().collect(),
            llm: self.llm.iter().map(|(k, s)| (k.clone(), s.clone())).collect(),
            latencies: self.latency.iter().map(|(k, h)| (k.clone(), h.clone())).collect(),
            ttfts: self.ttft.iter().map(|(k, h)| (k.clone(), h.clone())).collect(),
            budgets: self.budget_lines(),
        }
    }

    /// What a channel spent today (UTC) and its daily budget; `None` for
    /// what is not known (no `--budgets.file`, no daily budget, or a channel
    /// beyond the tracker's bound).
    pub(crate) fn spend_today(&self, channel: &str) -> (Option<f64>, Option<f64>) {
        match &self.budgets {
            Some(b) => (b.spend(channel).map(|s| s.day_usd), b.budgets().of(channel).and_then(|b| b.daily_usd)),
            None => (None, None),
        }
    }

    /// What the fleet spent today (UTC): the tracked bots and those gone
    /// this month; `None` without `--budgets.file`.
    pub(crate) fn spend_today_total(&self) -> Option<f64> {
        self.budgets.as_ref().map(|b| b.day_total(self.bots.keys().map(String::as_str)))
    }

    /// The bots with a budget and their spend, sorted by channel; empty
    /// without `--budgets.file`.
    pub(crate) fn budget_lines(&self) -> Vec<BudgetLine> {
        self.budgets.as_ref().map(|b| b.lines(self.bots.keys().map(String::as_str))).unwrap_or_default()
    }

    /// Starts tracking budgets (at start, with the spend read from the
    /// database).
    pub(crate) fn set_spend_tracker(&mut self, tracker: SpendTracker) {
        self.budgets = Some(tracker);
    }

    /// Replaces the budgets (on reload); the spend counted so far stays.
    /// Without a tracker (no `--budgets.file` at start) it does nothing.
    pub(crate) fn set_budgets(&mut self, budgets: Budgets) {
        if let Some(b) = self.budgets.as_mut() {
            b.set_budgets(budgets);
        }
    }

    /// The CPU seconds of all of a bot's processes seen while tracked.
    pub(crate) fn cpu_seconds_total(bot: &Bot) -> f64 {
        bot.cpu_base + bot.process.map_or(0.0, |p| p.cpu_seconds)
    }

    /// The tracked bots.
    pub(crate) fn bots(&self) -> impl Iterator<Item = &Bot> {
        self.bots.values()
    }

    /// Number of tracked bots.
    #[cfg(test)]
    pub(crate) fn bot_count(&self) -> usize {
        self.bots.len()
    }

    /// The LLM series.
    #[cfg(test)]
    pub(crate) fn llm_series(&self) -> impl Iterator<Item = (&LlmKey, &LlmSeries)> {
        self.llm.iter()
    }

    /// The price table in force.
    pub(crate) fn pricing(&self) -> &PriceTable {
        &self.pricing
    }

    /// Replaces the price table (on reload); later calls use the new prices.
    pub(crate) fn set_pricing(&mut self, pricing: PriceTable) {
        self.pricing = pricing;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_line;

    fn state() -> State {
        State::new(
            StateConfig { stale_after: 90.0, expiry: 3600.0, max_bots: 3, max_llm_series: 2, max_features_per_bot: 2 },
            PriceTable::builtin(),
            OverflowCounters {
                channel: IntCounter::new("c", "c").unwrap(),
                llm_series: IntCounter::new("l", "l").unwrap(),
                length: IntCounter::new("n", "n").unwrap(),
                features: IntCounter::new("f", "f").unwrap(),
                evicted: IntCounterVec::new(prometheus::Opts::new("e", "e"), &["status"]).unwrap(),
            },
        )
    }

    fn send(s: &mut State, line: &str, now: f64) -> Vec<Row> {
        let mut out = Vec::new();
        s.apply(parse_line(line.as_bytes()).unwrap(), now, None, &mut out).unwrap();
        out
    }

    fn events(rows: &[Row]) -> Vec<&'static str> {
        rows.iter().filter_map(|r| if let Row::BotEvent { event, .. } = r { Some(*event) } else { None }).collect()
    }

    #[test]
    fn lifecycle() {
        let mut s = state();
        let rows = send(&mut s, r#"{"type":"register","channel":"a","pid":1,"features":{"llm":true}}"#, 0.0);
        assert_eq!(events(&rows), ["register"]);
        assert!(send(&mut s, r#"{"type":"heartbeat","channel":"a","pid":1}"#, 30.0).is_empty());
        let mut out = Vec::new();
        s.tick(31.0, &mut out);
        assert!(matches!(out.as_slice(), [Row::BotStatus { status: "online", .. }]), "coalesced heartbeat written");
        out.clear();
        s.tick(121.0, &mut out);
        assert_eq!(events(&out), ["stale"]);
        assert_eq!(s.bots().next().unwrap().status, Status::Stale);
        let rows = send(&mut s, r#"{"type":"heartbeat","channel":"a","pid":1}"#, 130.0);
        assert_eq!(events(&rows), ["recovered"]);
        let rows = send(&mut s, r#"{"type":"heartbeat","channel":"a","pid":2}"#, 140.0);
        assert_eq!(events(&rows), ["restart"]);
        assert_eq!(s.bots().next().unwrap().restarts, 1);
        let mut out = Vec::new();
        let err =
            s.apply(parse_line(br#"{"type":"unregister","channel":"a","pid":1}"#).unwrap(), 150.0, None, &mut out);
        assert_eq!(err.unwrap_err().reason, Reason::PidMismatch);
        let rows = send(&mut s, r#"{"type":"unregister","channel":"a","pid":2}"#, 150.0);
        assert_eq!(events(&rows), ["unregister"]);
        let mut out = Vec::new();
        s.tick(150.0 + 3600.5, &mut out);
        assert_eq!(s.bot_count(), 0, "offline bot expired");
    }

    #[test]
    fn exemplars_name_the_latest_call() {
        let mut s = state();
        let ids = std::sync::Arc::new(UsageIds::new());
        ids.add_block(7, 9);
        s.set_usage_ids(ids);
        let usage = |latency: &str, trace: &str| {
            format!(
                r#"{{"type":"llm_usage","channel":"a","model":"m","feature":"f","tokens_in":1,"tokens_out":1{latency}{trace}}}"#
            )
        };
        let id = |rows: &[Row]| match rows {
            [Row::LlmUsage { id, .. }] => *id,
            other => panic!("{other:?}"),
        };
        let exemplar = |s: &State| s.latency[&("a".to_owned(), "m".to_owned())].exemplar.clone().unwrap();
        assert_eq!(id(&send(&mut s, &usage(r#","latency_ms":700"#, ""), 5.0)), Some(7));
        assert_eq!(exemplar(&s), Exemplar { bucket: 4, label: ExemplarLabel::UsageId(7), value: 0.7, timestamp: 5.0 });
        // A trace id wins over the row id; the row still gets its id.
        assert_eq!(id(&send(&mut s, &usage(r#","latency_ms":40"#, r#","trace_id":"t1""#), 6.0)), Some(8));
        assert_eq!(exemplar(&s).label, ExemplarLabel::TraceId("t1".into()));
        assert_eq!(exemplar(&s).bucket, 0);
        // No id left and no trace id: the row gets none, the exemplar stays.
        assert_eq!(id(&send(&mut s, &usage(r#","latency_ms":9000"#, ""), 7.0)), None);
        assert_eq!(exemplar(&s).label, ExemplarLabel::TraceId("t1".into()));
    }

    #[test]
    fn exemplars_of_dropped_rows_are_forgotten() {
        let mut s = state();
        let ids = std::sync::Arc::new(UsageIds::new());
        ids.add_block(10, 20);
        s.set_usage_ids(ids);
        let usage = |model: &str, trace: &str| {
            format!(
                r#"{{"type":"llm_usage","channel":"a","model":"{model}","feature":"f","tokens_in":1,"tokens_out":1,"latency_ms":100{trace}}}"#
            )
        };
        send(&mut s, &usage("m1", ""), 1.0); // id 10
        send(&mut s, &usage("m2", r#","trace_id":"t""#), 1.0); // id 11, named by its trace
        let label =
            |s: &State, m: &str| s.latency[&("a".to_owned(), m.to_owned())].exemplar.as_ref().map(|e| e.label.clone());
        let dropped = |m: &str, id: i64| vec![("a".to_owned(), m.to_owned(), id)];
        s.forget_exemplars(dropped("m1", 10));
        s.forget_exemplars(dropped("m2", 11));
        assert_eq!(label(&s, "m1"), None, "its row was dropped");
        assert_eq!(label(&s, "m2"), Some(ExemplarLabel::TraceId("t".into())), "a trace exists without the row");
        send(&mut s, &usage("m1", ""), 2.0); // id 12
        s.forget_exemplars(dropped("m1", 10));
        assert_eq!(label(&s, "m1"), Some(ExemplarLabel::UsageId(12)), "a later call that was written");
        // Beyond the series limit (two here) the call's exemplar is on the
        // overflow histogram.
        send(&mut s, &usage("m3", ""), 3.0); // id 13
        let overflow = (OVERFLOW_LABEL.to_owned(), OVERFLOW_LABEL.to_owned());
        assert_eq!(s.latency[&overflow].exemplar.as_ref().map(|e| e.label.clone()), Some(ExemplarLabel::UsageId(13)));
        s.forget_exemplars(dropped("m3", 13));
        assert_eq!(s.latency[&overflow].exemplar, None);
        // Many drops at once take the pass over every histogram instead.
        send(&mut s, &usage("m1", ""), 4.0); // id 14
        let many = vec![
            ("x".to_owned(), "y".to_owned(), 99),
            ("x".to_owned(), "y".to_owned(), 98),
            dropped("m1", 14)[0].clone(),
        ];
        assert!(many.len() * 2 > s.latency.len());
        s.forget_exemplars(many);
        assert_eq!(label(&s, "m1"), None);
        assert_eq!(label(&s, "m2"), Some(ExemplarLabel::TraceId("t".into())));
    }

    #[test]
    fn features_per_bot_are_bounded() {
        let mut s = state();
        send(
            &mut s,
            r#"{"type":"register","channel":"a","pid":1,"features":{"a":true,"b":false,"c":true,"d":true}}"#,
            0.0,
        );
        let bot = s.bots().next().unwrap();
        assert_eq!(bot.features, [("a".to_owned(), true), ("b".to_owned(), false)]);
        assert_eq!(s.overflow.features.get(), 2);
    }

    #[test]
    fn a_dropped_status_row_is_written_again() {
        let mut s = state();
        send(&mut s, r#"{"type":"register","channel":"a","pid":1}"#, 0.0);
        let rows = send(&mut s, r#"{"type":"unregister","channel":"a","pid":1}"#, 1.0);
        assert!(rows.iter().any(|r| matches!(r, Row::BotStatus { status: "offline", .. })));
        // Nothing is behind: a tick writes nothing.
        let mut out = Vec::new();
        s.tick(2.0, &mut out);
        assert!(out.is_empty(), "{out:?}");
        // The queue dropped that row: the next tick writes the state again.
        s.mark_unwritten(vec!["a".to_owned(), "unknown".to_owned()]);
        s.tick(2.5, &mut out);
        assert!(matches!(out.as_slice(), [Row::BotStatus { status: "offline", .. }]), "{out:?}");
        // And the shutdown flush does too.
        s.mark_unwritten(vec!["a".to_owned()]);
        let mut out = Vec::new();
        s.flush(3.0, &mut out);
        assert!(matches!(out.as_slice(), [Row::BotStatus { status: "offline", .. }]), "{out:?}");
    }

    #[test]
    fn implicit_registration_and_limits() {
        let mut s = state();
        let rows = send(&mut s, r#"{"type":"heartbeat","channel":"x","pid":9}"#, 0.0);
        assert_eq!(events(&rows), ["register"]);
        send(&mut s, r#"{"type":"heartbeat","channel":"y","pid":9}"#, 0.0);
        send(&mut s, r#"{"type":"heartbeat","channel":"z","pid":9}"#, 0.0);
        let mut out = Vec::new();
        let err = s.apply(parse_line(br#"{"type":"heartbeat","channel":"w","pid":9}"#).unwrap(), 0.0, None, &mut out);
        assert_eq!(err.unwrap_err().reason, Reason::TooManyBots);
        assert_eq!(s.overflow.channel.get(), 1);
        for m in ["m1", "m2", "m3", "m4"] {
            let line = format!(
                r#"{{"type":"llm_usage","channel":"x","model":"{m}","feature":"f","tokens_in":1,"tokens_out":1,"latency_ms":5,"ttft_ms":2,"error_type":"timeout"}}"#
            );
            send(&mut s, &line, 0.0);
        }
        assert_eq!(s.llm_series().count(), 3, "two real series and one overflow series");
        assert_eq!(s.overflow.llm_series.get(), 2);
        // Histograms follow their series into `other`: one per series key.
        assert_eq!(s.latency.len(), 3);
        assert_eq!(s.latency[&(OVERFLOW_LABEL.to_owned(), OVERFLOW_LABEL.to_owned())].count, 2);
        assert_eq!(s.ttft.len(), 3, "so do time-to-first-token histograms");
        assert_eq!(s.ttft[&(OVERFLOW_LABEL.to_owned(), OVERFLOW_LABEL.to_owned())].count, 2);
        let other = s.llm_series().find(|(k, _)| k.0 == OVERFLOW_LABEL).unwrap().1;
        assert_eq!(other.errors, [2, 0, 0, 0, 0, 0], "error types keep their label in `other`");
        // Expired series take their histograms with them (once their bots
        // are gone: stale bots never expire, offline ones do).
        for c in ["x", "y", "z"] {
            send(&mut s, &format!(r#"{{"type":"unregister","channel":"{c}","pid":9}}"#), 7200.0);
        }
        s.tick(7200.0 + 3601.0, &mut Vec::new());
        assert_eq!((s.llm_series().count(), s.latency.len(), s.ttft.len()), (0, 0, 0));
    }

    #[test]
    fn cost_by_source_and_unpriced_calls() {
        let mut s = state();
        let usage = |model: &str, extra: &str| {
            format!(
                r#"{{"type":"llm_usage","channel":"x","model":"{model}","feature":"f","tokens_in":1000000,"tokens_out":0{extra}}}"#
            )
        };
        send(&mut s, &usage("gpt-4", ""), 0.0);
        send(&mut s, &usage("gpt-4", r#","cost_usd":0.5"#), 0.0);
        send(&mut s, &usage("mystery-9000", ""), 0.0);
        // The state allows two series: the third model folds into `other`
        // and keeps its cost source.
        send(&mut s, &usage("mystery-9001", ""), 0.0);
        let series: HashMap<_, _> = s.llm_series().map(|(k, v)| (k.1.clone(), v.clone())).collect();
        assert_eq!(series["gpt-4"].cost_usd, [Some(0.5), Some(30.0), None]);
        assert_eq!(series["gpt-4"].unpriced, 0);
        assert_eq!(series["mystery-9000"].cost_usd, [None, None, Some(1.0)], "the default price is a fallback");
        assert_eq!(series["mystery-9000"].unpriced, 1, "a fallback price still counts as unpriced");
        assert_eq!(series[OVERFLOW_LABEL].cost_usd, [None, None, Some(1.0)]);
        assert_eq!(series[OVERFLOW_LABEL].unpriced, 1);
        s.set_pricing(
            PriceTable::parse("unknown_models = \"unpriced\"", std::path::Path::new("f"), Some(PriceTable::builtin()))
                .unwrap(),
        );
        let rows = send(&mut s, &usage("mystery-9000", ""), 0.0);
        assert!(matches!(rows.as_slice(), [Row::LlmUsage { cost_usd: None, cost_source: "unpriced", .. }]));
        let series: HashMap<_, _> = s.llm_series().map(|(k, v)| (k.1.clone(), v.clone())).collect();
        assert_eq!(series["mystery-9000"].cost_usd, [None, None, Some(1.0)], "no price adds nothing");
        assert_eq!(series["mystery-9000"].unpriced, 2);
    }

    /// A sampler pass that finds the process of `channel` gone.
    fn process_gone(s: &mut State, channel: &str, pid: u32, now: f64) {
        let gone = Sample { channel: channel.into(), pid, result: SampleResult::Gone("process gone") };
        s.record_samples(vec![gone], now);
    }

    fn evicted(s: &State, status: &str) -> u64 {
        s.overflow.evicted.with_label_values(&[status]).get()
    }

    #[test]
    fn dead_and_stale_bots_never_expire_offline_ones_do() {
        let mut s = state();
        for c in ["off", "hung", "dead"] {
            send(&mut s, &format!(r#"{{"type":"register","channel":"{c}","pid":1}}"#), 0.0);
        }
        let usage = r#"{"type":"llm_usage","channel":"dead","model":"m","feature":"f","tokens_in":1,"tokens_out":1,"latency_ms":5}"#;
        send(&mut s, usage, 1.0);
        send(&mut s, r#"{"type":"unregister","channel":"off","pid":1}"#, 10.0);
        process_gone(&mut s, "dead", 1, 20.0);
        s.tick(200.0, &mut Vec::new());
        let status = |s: &State, c: &str| s.bots.get(c).map(|b| b.status);
        assert_eq!(status(&s, "hung"), Some(Status::Stale));
        assert_eq!(status(&s, "dead"), Some(Status::Dead));
        // Ten times the expiry later: only the bot that unregistered is gone.
        s.tick(10.0 * 3600.0, &mut Vec::new());
        assert_eq!(status(&s, "off"), None, "offline bots expire");
        assert_eq!(status(&s, "hung"), Some(Status::Stale), "a hung bot keeps paging");
        assert_eq!(status(&s, "dead"), Some(Status::Dead), "a crashed bot keeps paging");
        assert_eq!(s.llm_series().count(), 1, "the dead bot's LLM series stay with it");
        // The hung bot comes back: online again, and it may expire later.
        let rows = send(&mut s, r#"{"type":"heartbeat","channel":"hung","pid":1}"#, 10.0 * 3600.0 + 1.0);
        assert_eq!(events(&rows), ["recovered"]);
    }

    #[test]
    fn a_full_registry_evicts_the_bot_gone_longest() {
        let mut s = state(); // three bots at most
        for c in ["a", "b", "c"] {
            send(&mut s, &format!(r#"{{"type":"register","channel":"{c}","pid":1}}"#), 0.0);
        }
        // Every bot online: a new one is refused, at no search per line.
        let mut out = Vec::new();
        let w = || parse_line(br#"{"type":"register","channel":"w","pid":1}"#).unwrap();
        assert_eq!(s.apply(w(), 1.0, None, &mut out).unwrap_err().reason, Reason::TooManyBots);
        assert!(!s.evictable);
        // a dies first, then b hangs, then c unregisters.
        process_gone(&mut s, "a", 1, 10.0);
        s.tick(95.0, &mut out); // a is dead already; b and c have gone silent
        send(&mut s, r#"{"type":"heartbeat","channel":"c","pid":1}"#, 96.0);
        send(&mut s, r#"{"type":"unregister","channel":"c","pid":1}"#, 97.0);
        assert_eq!(s.bots["b"].status, Status::Stale);
        // The offline bot goes first, though it is the newest departure.
        let rows = send(&mut s, r#"{"type":"register","channel":"d","pid":1}"#, 100.0);
        assert_eq!(events(&rows), ["evicted", "register"]);
        assert!(matches!(&rows[0], Row::BotEvent { channel, .. } if channel == "c"), "{rows:?}");
        assert_eq!(evicted(&s, "offline"), 1);
        // Then the bot dead or stale longest: a (dead since 10 s), then b.
        let rows = send(&mut s, r#"{"type":"register","channel":"e","pid":1}"#, 101.0);
        assert!(
            matches!(&rows[0], Row::BotEvent { channel, event: "evicted", detail: Some(d), .. }
            if channel == "a" && d.starts_with("was dead for 91s")),
            "{rows:?}"
        );
        assert_eq!(evicted(&s, "dead"), 1);
        send(&mut s, r#"{"type":"register","channel":"f","pid":1}"#, 102.0);
        assert_eq!(evicted(&s, "stale"), 1);
        assert!(!s.bots.contains_key("b"));
        // No row says an evicted bot is anything but what it was.
        assert!(!rows.iter().any(|r| matches!(r, Row::BotStatus { channel, .. } if channel == "a")));
        // All online again: refused, and counted as before.
        assert_eq!(s.apply(w(), 103.0, None, &mut out).unwrap_err().reason, Reason::TooManyBots);
        assert_eq!(s.overflow.channel.get(), 2);
        assert_eq!(s.bot_count(), 3);
    }

    #[test]
    fn an_operator_forgets_a_dead_bot() {
        let mut s = state();
        send(&mut s, r#"{"type":"register","channel":"up","pid":1}"#, 0.0);
        send(&mut s, r#"{"type":"register","channel":"dead","pid":2}"#, 0.0);
        process_gone(&mut s, "dead", 2, 5.0);
        let mut out = Vec::new();
        s.tick(6.0, &mut out);
        out.clear();
        assert_eq!(s.forget("nobody", 7.0), Forget::Unknown);
        assert_eq!(s.forget("up", 7.0), Forget::Online);
        assert_eq!(s.forget("dead", 7.0), Forget::Forgotten(Status::Dead));
        assert_eq!(s.bot_count(), 1);
        // The rows go out with the next tick.
        s.tick(8.0, &mut out);
        assert_eq!(events(&out), ["forgotten"]);
        assert!(
            matches!(out.as_slice(), [_, Row::BotStatus { channel, status: FORGOTTEN, pid: 2, .. }] if channel == "dead"),
            "{out:?}"
        );
        // A full queue dropped the status row: it is written again.
        s.mark_unwritten(vec!["dead".to_owned()]);
        out.clear();
        s.tick(9.0, &mut out);
        assert!(matches!(out.as_slice(), [Row::BotStatus { status: FORGOTTEN, .. }]), "{out:?}");
        // Long after, nothing is kept for it any more.
        s.tick(9.0 + FORGOTTEN_REWRITE_WINDOW + 1.0, &mut out);
        assert!(s.forgotten.is_empty());
        // A forgotten bot that sends again is a new bot, and a forgotten
        // row not yet sent never overwrites it.
        process_gone(&mut s, "up", 1, 100.0);
        assert_eq!(s.forget("up", 101.0), Forget::Forgotten(Status::Dead));
        let rows = send(&mut s, r#"{"type":"register","channel":"up","pid":3}"#, 102.0);
        assert_eq!(events(&rows), ["register"]);
        out.clear();
        s.tick(103.0, &mut out);
        assert_eq!(events(&out), ["dead", "forgotten"]);
        assert!(!out.iter().any(|r| matches!(r, Row::BotStatus { .. })), "{out:?}");
        assert!(s.forgotten.is_empty());
    }

    #[test]
    fn restore_keeps_bots_that_never_unregistered_however_old() {
        let now = 1_000_000.0;
        let bot = |channel: &str, status: &str, last_seen: f64| RestoredBot {
            channel: channel.into(),
            pid: 7,
            status: status.into(),
            features: Vec::new(),
            registered_at: last_seen,
            last_seen,
        };
        let day = 86_400.0;
        let rows = vec![
            bot("dead", "dead", now - 30.0 * day),
            bot("hung", "stale", now - 2.0 * day),
            bot("was-online", "online", now - day),
            bot("left", "offline", now - 2.0 * 3600.0),
            bot("left-recently", "offline", now - 60.0),
            bot("forgotten", FORGOTTEN, now - 10.0),
        ];
        let mut s = state();
        s.config.max_bots = 10;
        assert_eq!(s.restore(rows.clone(), now), 4);
        let mut kept: Vec<_> = s.bots.keys().cloned().collect();
        kept.sort();
        assert_eq!(kept, ["dead", "hung", "left-recently", "was-online"]);
        assert!(s.evictable);
        // The online one died while the exporter was down: it goes stale.
        let mut out = Vec::new();
        s.tick(now + 1.0, &mut out);
        assert_eq!(s.bots["was-online"].status, Status::Stale);
        // Beyond the limit the most recently seen win.
        let mut s = state(); // three bots at most
        assert_eq!(s.restore(rows, now), 3);
        assert!(!s.bots.contains_key("dead"), "the oldest is left out");
    }

    #[test]
    fn spend_series_and_totals_outlive_the_bots() {
        let mut s = state();
        let budgets =
            Budgets::parse("[[budget]]\nchannel = \"*\"\ndaily_usd = 10.0\n", std::path::Path::new("b")).unwrap();
        let noon = 1_796_083_200.0 + 12.0 * 3600.0;
        s.set_spend_tracker(SpendTracker::new(budgets, HashMap::new(), noon, 10));
        for (c, cost) in [("a", 1.0), ("b", 2.0)] {
            send(&mut s, &format!(r#"{{"type":"register","channel":"{c}","pid":1}}"#), noon);
            let usage = format!(
                r#"{{"type":"llm_usage","channel":"{c}","model":"m","feature":"f","tokens_in":1,"tokens_out":1,"cost_usd":{cost}}}"#
            );
            send(&mut s, &usage, noon);
        }
        send(&mut s, r#"{"type":"unregister","channel":"a","pid":1}"#, noon + 1.0);
        let channels =
            |s: &State| s.budget_lines().into_iter().map(|l| (l.channel, l.spend.day_usd)).collect::<Vec<_>>();
        assert_eq!(channels(&s), [("a".to_owned(), 1.0), ("b".to_owned(), 2.0)]);
        assert_eq!(s.spend_today_total(), Some(3.0));
        // a expires, b is forgotten: their spend stays in the series and the
        // total until the period ends.
        s.tick(noon + 3602.0, &mut Vec::new());
        process_gone(&mut s, "b", 1, noon + 3603.0);
        assert_eq!(s.forget("b", noon + 3604.0), Forget::Forgotten(Status::Dead));
        assert_eq!(s.bot_count(), 0);
        assert_eq!(channels(&s), [("a".to_owned(), 1.0), ("b".to_owned(), 2.0)]);
        assert_eq!(s.spend_today_total(), Some(3.0));
        // A new day: the same series, at 0; a new month: gone.
        s.tick(noon + 86_400.0, &mut Vec::new());
        assert_eq!(channels(&s), [("a".to_owned(), 0.0), ("b".to_owned(), 0.0)]);
        s.tick(noon + 40.0 * 86_400.0, &mut Vec::new());
        assert!(channels(&s).is_empty());
    }
}
