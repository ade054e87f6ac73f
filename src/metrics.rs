//! The Prometheus side: the exporter's own metrics and a collector that
//! renders the per-bot and LLM series from the live [`State`] at scrape time.
//!
//! Rendering from the state (instead of keeping a labelled metric per bot)
//! means a bot that is forgotten leaves no ghost series behind, and the
//! heartbeat age is computed at the instant of the scrape. Nothing here does
//! I/O.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use prometheus::Gauge as GaugeMetric;

use crate::budget::{BudgetLine, Period};
use crate::event::{ErrorType, Event, Reason};
use crate::pricing::CostSource;
use crate::state::{ExemplarLabel, Latency, Snapshot, State, Status, LATENCY_BUCKETS};

/// Why a row was not written: the `reason` values of
/// `kissbot_exporter_events_dropped_total`.
pub(crate) const DROP_REASONS: [&str; 3] = ["queue_full", "writer_stopped", "db_error"];

/// The exporter's own metrics, registered in `Metrics::registry`.
#[derive(Clone)]
pub struct Metrics {
    /// The registry that `/metrics` renders.
    pub(crate) registry: Registry,
    /// Accepted messages by type.
    pub(crate) messages: IntCounterVec,
    /// Rejected lines by reason.
    pub(crate) rejected: IntCounterVec,
    /// Socket connections accepted.
    pub(crate) connections: IntCounter,
    /// Socket connections open now.
    pub(crate) connections_active: IntGauge,
    /// Socket connections refused, by reason.
    pub(crate) connections_rejected: IntCounterVec,
    /// Socket connections closed to free their slot, by reason.
    pub(crate) connections_evicted: IntCounterVec,
    /// Rows waiting for the writer.
    pub(crate) queue_depth: IntGauge,
    /// Capacity of the writer queue.
    pub(crate) queue_capacity: IntGauge,
    /// Rows not written, by reason.
    pub(crate) events_dropped: IntCounterVec,
    /// Rows committed to SQLite.
    pub(crate) db_rows_written: IntCounter,
    /// Rows deleted by retention, by table.
    pub(crate) db_rows_deleted: IntCounterVec,
    /// Failed SQLite transactions.
    pub(crate) db_write_errors: IntCounter,
    /// Bytes held by large HTTP response bodies still being sent.
    pub(crate) http_response_bytes: IntGauge,
    /// 1 while the last database write succeeded.
    pub(crate) db_up: IntGauge,
    /// Values cut to a cardinality limit, by label.
    pub label_overflow: IntCounterVec,
    /// Bots evicted to admit a new bot at `--limits.max-bots`, by the
    /// status they had.
    pub bots_evicted: IntCounterVec,
    /// Messages whose pid is not the sending process.
    pub(crate) peer_pid_mismatches: IntCounter,
    /// Pricing reloads by outcome (`success`, `failure`).
    pub(crate) config_reloads: IntCounterVec,
    /// 1 if the last pricing (re)load succeeded.
    pub(crate) config_last_reload_successful: IntGauge,
    /// Duration of the last sampler pass.
    pub(crate) sampler_duration: GaugeMetric,
    /// Unix time of the last completed sampler pass.
    pub(crate) sampler_last_success: GaugeMetric,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl Metrics {
    /// Creates and registers every exporter metric, including the standard
    /// `process_*` metrics of this process.
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let build_info = IntGaugeVec::new(
            opts("kissbot_exporter_build_info", "Build information of the exporter; always 1."),
            &["version"],
        )?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let m = Metrics {
            messages: IntCounterVec::new(
                opts("kissbot_exporter_messages_total", "Messages accepted from bots, by type."),
                &["type"],
            )?,
            rejected: IntCounterVec::new(
                opts("kissbot_exporter_messages_rejected_total", "Lines rejected, by reason."),
                &["reason"],
            )?,
            connections: IntCounter::with_opts(opts(
                "kissbot_exporter_connections_total",
                "Socket connections accepted.",
            ))?,
            connections_active: IntGauge::with_opts(opts(
                "kissbot_exporter_connections_active",
                "Socket connections open now.",
            ))?,
            connections_rejected: IntCounterVec::new(
                opts("kissbot_exporter_connections_rejected_total", "Socket connections refused, by reason."),
                &["reason"],
            )?,
            connections_evicted: IntCounterVec::new(
                opts(
                    "kissbot_exporter_connections_evicted_total",
                    "Socket connections closed to free their slot: a line not completed within --socket.line-timeout, or the slot taken by a new connection at --socket.max-connections.",
                ),
                &["reason"],
            )?,
            queue_depth: IntGauge::with_opts(opts(
                "kissbot_exporter_queue_depth",
                "Rows queued for the database writer.",
            ))?,
            queue_capacity: IntGauge::with_opts(opts(
                "kissbot_exporter_queue_capacity",
                "Capacity of the database writer queue, in rows.",
            ))?,
            events_dropped: IntCounterVec::new(
                opts(
                    "kissbot_exporter_events_dropped_total",
                    "Rows that were not written to the database, by reason. Metrics still counted them.",
                ),
                &["reason"],
            )?,
            db_rows_written: IntCounter::with_opts(opts(
                "kissbot_exporter_db_rows_written_total",
                "Rows committed to SQLite.",
            ))?,
            db_rows_deleted: IntCounterVec::new(
                opts(
                    "kissbot_exporter_db_rows_deleted_total",
                    "Rows deleted from SQLite by retention (--db.retention, --db.llm-usage-retention), by table.",
                ),
                &["table"],
            )?,
            http_response_bytes: IntGauge::with_opts(opts(
                "kissbot_exporter_http_response_bytes",
                "Bytes held by large HTTP response bodies (metrics, landing page, bots list) not yet sent; bounded by --web.max-response-memory-mib.",
            ))?,
            db_write_errors: IntCounter::with_opts(opts(
                "kissbot_exporter_db_write_errors_total",
                "SQLite transactions that failed (each is retried).",
            ))?,
            db_up: IntGauge::with_opts(opts(
                "kissbot_exporter_db_up",
                "1 if the last database write succeeded, 0 otherwise.",
            ))?,
            label_overflow: IntCounterVec::new(
                opts("kissbot_exporter_label_overflow_total", "Events whose labels hit a cardinality limit, by label."),
                &["label"],
            )?,
            bots_evicted: IntCounterVec::new(
                opts(
                    "kissbot_exporter_bots_evicted_total",
                    "Bots evicted to admit a new bot at --limits.max-bots, by the status they had; an evicted dead or stale bot stops alerting.",
                ),
                &["status"],
            )?,
            peer_pid_mismatches: IntCounter::with_opts(opts(
                "kissbot_exporter_peer_pid_mismatches_total",
                "Messages whose pid is not the pid of the process that sent them (possible spoofing).",
            ))?,
            config_reloads: IntCounterVec::new(
                opts("kissbot_exporter_config_reloads_total", "Reloads of the pricing and budgets files (SIGHUP or POST /-/reload), by outcome."),
                &["outcome"],
            )?,
            config_last_reload_successful: IntGauge::with_opts(opts(
                "kissbot_exporter_config_last_reload_successful",
                "1 if the last pricing file (re)load succeeded; the old table stays in force otherwise.",
            ))?,
            sampler_duration: GaugeMetric::with_opts(opts(
                "kissbot_exporter_sampler_duration_seconds",
                "Duration of the last process sampler pass.",
            ))?,
            sampler_last_success: GaugeMetric::with_opts(opts(
                "kissbot_exporter_sampler_last_success_timestamp_seconds",
                "Unix time of the last completed process sampler pass.",
            ))?,
            registry,
        };
        // Pre-create the closed label sets so every series exists from the
        // first scrape and rate() works on the first increment.
        for r in Reason::ALL {
            m.rejected.with_label_values(&[r.as_str()]);
        }
        for t in Event::KINDS {
            m.messages.with_label_values(&[t]);
        }
        for r in DROP_REASONS {
            m.events_dropped.with_label_values(&[r]);
        }
        for t in ["bot_metrics", "bot_events", "llm_usage"] {
            m.db_rows_deleted.with_label_values(&[t]);
        }
        for l in ["channel", "llm_series", "length", "features"] {
            m.label_overflow.with_label_values(&[l]);
        }
        for s in [Status::Offline, Status::Stale, Status::Dead] {
            m.bots_evicted.with_label_values(&[s.as_str()]);
        }
        for r in ["line_timeout", "limit"] {
            m.connections_evicted.with_label_values(&[r]);
        }
        m.connections_rejected.with_label_values(&["uid"]);
        for o in ["success", "failure"] {
            m.config_reloads.with_label_values(&[o]);
        }
        m.config_last_reload_successful.set(1);
        let r = &m.registry;
        r.register(Box::new(build_info))?;
        r.register(Box::new(m.messages.clone()))?;
        r.register(Box::new(m.rejected.clone()))?;
        r.register(Box::new(m.connections.clone()))?;
        r.register(Box::new(m.connections_active.clone()))?;
        r.register(Box::new(m.connections_rejected.clone()))?;
        r.register(Box::new(m.connections_evicted.clone()))?;
        r.register(Box::new(m.queue_depth.clone()))?;
        r.register(Box::new(m.queue_capacity.clone()))?;
        r.register(Box::new(m.events_dropped.clone()))?;
        r.register(Box::new(m.db_rows_written.clone()))?;
        r.register(Box::new(m.db_rows_deleted.clone()))?;
        r.register(Box::new(m.http_response_bytes.clone()))?;
        r.register(Box::new(m.db_write_errors.clone()))?;
        r.register(Box::new(m.db_up.clone()))?;
        r.register(Box::new(m.label_overflow.clone()))?;
        r.register(Box::new(m.bots_evicted.clone()))?;
        r.register(Box::new(m.peer_pid_mismatches.clone()))?;
        r.register(Box::new(m.config_reloads.clone()))?;
        r.register(Box::new(m.config_last_reload_successful.clone()))?;
        r.register(Box::new(m.sampler_duration.clone()))?;
        r.register(Box::new(m.sampler_last_success.clone()))?;
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(m)
    }

    /// Renders every metric in the Prometheus text format 0.0.4: the
    /// registry's families, then the per-bot and LLM series of `snapshot`
    /// (taken by the caller under the state lock) as of `now`.
    pub fn render(&self, snapshot: &Snapshot, now: f64) -> String {
        let mut out = String::new();
        self.render_into(snapshot, now, &mut out);
        out
    }

    /// About how many bytes [`Metrics::render`] writes for `snapshot`:
    /// measured at about 1.4 KB per bot and 1.4 KB per LLM series with its
    /// histogram, plus the exporter's own families.
    pub(crate) fn size_hint(snapshot: &Snapshot) -> usize {
        64 * 1024 + 1500 * (snapshot.bots.len() + snapshot.llm.len())
    }

    /// [`Metrics::render`] appended to `out`.
    pub(crate) fn render_into(&self, snapshot: &Snapshot, now: f64, out: &mut String) {
        // Reserving it up front saves the copies of a growing buffer.
        out.reserve(Metrics::size_hint(snapshot));
        // Encoding into a String cannot fail: the families come from our own
        // registry and empty ones are pruned by `gather`.
        let _ = prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), out);
        render_state(snapshot, now, &mut Body { text: out, format: Format::Text });
    }

    /// Renders `format`, appended to `out`: [`Metrics::render_into`] for the
    /// text format, [`Metrics::render_openmetrics_into`] for OpenMetrics.
    pub(crate) fn render_format_into(&self, format: Format, snapshot: &Snapshot, now: f64, out: &mut String) {
        match format {
            Format::Text => self.render_into(snapshot, now, out),
            Format::OpenMetrics => self.render_openmetrics_into(snapshot, now, out),
        }
    }

    /// Renders every metric in OpenMetrics 1.0, appended to `out`: the same
    /// families and samples as the text format, with counters' family names
    /// without `_total`, an exemplar on the latency bucket of each
    /// histogram's latest named call, and the closing `# EOF`.
    pub(crate) fn render_openmetrics_into(&self, snapshot: &Snapshot, now: f64, out: &mut String) {
        out.reserve(Metrics::size_hint(snapshot));
        let mut body = Body { text: out, format: Format::OpenMetrics };
        // The prometheus crate encodes only the text format and protobuf.
        encode_openmetrics(&self.registry.gather(), &mut body);
        render_state(snapshot, now, &mut body);
        body.push_str("# EOF\n");
    }
}

/// The exposition formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// The Prometheus text format 0.0.4.
    Text,
    /// OpenMetrics 1.0: the text format with exemplars.
    OpenMetrics,
}

impl Format {
    /// The `Content-Type` of a body in this format.
    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The buffer a render writes to, and the format it writes. The text and
/// OpenMetrics renders share every line but the counters' `# HELP` and
/// `# TYPE` lines, the exemplars and the end; those few places look at
/// `format`, everything else writes to the string it derefs to.
struct Body<'a> {
    text: &'a mut String,
    format: Format,
}

impl std::ops::Deref for Body<'_> {
    type Target = String;

    fn deref(&self) -> &String {
        self.text
    }
}

impl std::ops::DerefMut for Body<'_> {
    fn deref_mut(&mut self) -> &mut String {
        self.text
    }
}

/// Encodes the registry's families in OpenMetrics. They are counters and
/// gauges only, the process collector's too; the exporter registers no
/// histogram or summary, and a unit test keeps it so.
fn encode_openmetrics(families: &[prometheus::proto::MetricFamily], out: &mut Body<'_>) {
    use prometheus::proto::MetricType;
    let mut labels = String::new();
    for mf in families {
        let name = mf.name();
        let kind = match mf.get_field_type() {
            MetricType::COUNTER => "counter",
            MetricType::GAUGE => "gauge",
            _ => continue,
        };
        header(out, name, &escape_help(mf.help()), kind);
        for m in mf.get_metric() {
            labels.clear();
            for (i, l) in m.get_label().iter().enumerate() {
                if i > 0 {
                    labels.push(',');
                }
                let _ = write!(labels, "{}=\"{}\"", l.name(), escape(l.value()));
            }
            let v = if kind == "counter" { m.get_counter().get_value() } else { m.get_gauge().get_value() };
            sample(out, name, &labels, v);
        }
    }
}

/// Escapes a `# HELP` text for OpenMetrics: backslash, newline, quote.
fn escape_help(s: &str) -> Cow<'_, str> {
    if !s.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(s.replace('\\', "\\\\").replace('\n', "\\n").replace('"', "\\\""))
}

/// Escapes a label value for the text format: backslash, quote, newline.
fn escape(s: &str) -> Cow<'_, str> {
    if !s.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Integers below this are exact in an f64 and written without `fmt`.
const EXACT_INTEGER: f64 = 9_007_199_254_740_992.0;

/// Writes a sample value as the text format expects. Most values are counts
/// and flags: those take the integer fast path, which is several times
/// cheaper than `fmt` and matters at hundreds of thousands of lines.
fn value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < EXACT_INTEGER {
        out.push_str(itoa::Buffer::new().format(v as i64));
    } else {
        let _ = write!(out, "{v}");
    }
}

fn header(out: &mut Body<'_>, name: &str, help: &str, kind: &str) {
    // OpenMetrics names a counter family without the `_total` its samples
    // carry.
    let name = match out.format {
        Format::OpenMetrics if kind == "counter" => name.strip_suffix("_total").unwrap_or(name),
        _ => name,
    };
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One sample line: `name{labels} value`, labels already escaped.
fn sample(out: &mut Body<'_>, name: &str, labels: &str, v: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        out.push_str(labels);
        out.push('}');
    }
    out.push(' ');
    value(out, v);
    out.push('\n');
}

/// Appends the exemplar of `h` to the bucket line just written, if that is
/// the bucket of its latest named call and the format is OpenMetrics:
/// ` # {llm_usage_id="42"} 1.85 1796000000.5`. The label set stays within
/// the 128 characters OpenMetrics allows: an id has at most 19 digits, a
/// trace id at most [`crate::event::MAX_TRACE_ID_BYTES`] characters that need no escaping.
fn exemplar(out: &mut Body<'_>, h: &Latency, bucket: usize) {
    let Some(e) = h.exemplar.as_ref().filter(|e| e.bucket == bucket) else { return };
    if out.format != Format::OpenMetrics {
        return;
    }
    out.pop();
    match &e.label {
        ExemplarLabel::UsageId(id) => {
            out.push_str(" # {llm_usage_id=\"");
            out.push_str(itoa::Buffer::new().format(*id));
        }
        ExemplarLabel::TraceId(t) => {
            out.push_str(" # {trace_id=\"");
            out.push_str(t);
        }
    }
    out.push_str("\"} ");
    value(out, e.value);
    out.push(' ');
    value(out, e.timestamp);
    out.push('\n');
}

/// A per-bot family: name, help, type, and the value (none: no series).
type BotFamily<'a> = (&'a str, &'a str, &'a str, &'a dyn Fn(&crate::state::Bot) -> Option<f64>);

/// A family from a bot's process sample: name, help, value.
type ProcessFamily<'a> = (&'a str, &'a str, &'a dyn Fn(&crate::state::ProcessInfo) -> f64);

/// An LLM counter family: name, help, value.
type LlmFamily<'a> = (&'a str, &'a str, &'a dyn Fn(&crate::state::LlmSeries) -> f64);

/// Renders the per-bot and LLM series straight from the state into text.
///
/// Building the `prometheus` crate's object tree for hundreds of thousands
/// of series, sorting and encoding it cost most of a scrape and left the
/// allocator holding the tree's memory; writing text directly from one pass
/// over the state is several times faster. Series are sorted by label so
/// the output is stable.
fn render_state(state: &Snapshot, now: f64, out: &mut Body<'_>) {
    let mut bots: Vec<_> = state.bots.iter().map(|b| (escape(&b.channel), b)).collect();
    bots.sort_by(|a, b| a.0.cmp(&b.0));
    let per_bot: [BotFamily<'_>; 8] = [
        ("kissbot_bot_up", "1 if the bot is online, 0 otherwise.", "gauge", &|b| {
            Some(f64::from(u8::from(b.status == Status::Online)))
        }),
        (
            "kissbot_bot_last_heartbeat_timestamp_seconds",
            "Unix time of the last heartbeat or register.",
            "gauge",
            &|b| Some(b.last_heartbeat),
        ),
        ("kissbot_bot_heartbeat_age_seconds", "Seconds since the last heartbeat, at scrape time.", "gauge", &|b| {
            Some((now - b.last_heartbeat).max(0.0))
        }),
        ("kissbot_bot_registered_timestamp_seconds", "Unix time the current bot process registered.", "gauge", &|b| {
            Some(b.registered_at)
        }),
        ("kissbot_bot_heartbeats_total", "Heartbeats received.", "counter", &|b| Some(b.heartbeats as f64)),
        ("kissbot_bot_restarts_total", "Restarts seen (a new pid for the channel).", "counter", &|b| {
            Some(b.restarts as f64)
        }),
        (
            "kissbot_bot_process_alive",
            "1 if the bot's process runs, 0 if it is gone; absent when its pid is not visible.",
            "gauge",
            &|b| b.process.map(|p| f64::from(u8::from(p.alive))),
        ),
        ("kissbot_bot_cpu_seconds_total", "CPU time used by the bot's processes while tracked.", "counter", &|b| {
            b.process.map(|_| State::cpu_seconds_total(b))
        }),
    ];
    let sampled: [ProcessFamily<'_>; 3] = [
        ("kissbot_bot_resident_memory_bytes", "Resident memory of the bot's process.", &|p| p.rss_bytes as f64),
        ("kissbot_bot_virtual_memory_bytes", "Virtual memory of the bot's process.", &|p| p.vms_bytes as f64),
        ("kissbot_bot_process_start_time_seconds", "Start time of the bot's process, Unix seconds.", &|p| {
            p.start_time as f64
        }),
    ];
    // Each bot's `channel="..."` is built once, not once per line.
    let bots: Vec<(String, &crate::state::Bot)> =
        bots.into_iter().map(|(ch, b)| (format!("channel=\"{ch}\""), b)).collect();
    let mut labels = String::with_capacity(256);
    for (name, help, kind, get) in per_bot {
        let mut first = true;
        for (ch, bot) in &bots {
            let Some(v) = get(bot) else { continue };
            if first {
                header(out, name, help, kind);
                first = false;
            }
            sample(out, name, ch, v);
        }
    }
    for (name, help, get) in sampled {
        let mut first = true;
        for (ch, bot) in &bots {
            // A process seen only as gone has no figures worth showing.
            let Some(p) = bot.process.filter(|p| p.start_time > 0) else { continue };
            if first {
                header(out, name, help, "gauge");
                first = false;
            }
            sample(out, name, ch, get(&p));
        }
    }
    if !bots.is_empty() {
        header(out, "kissbot_bot_status", "Bot state as a state set: 1 for the current state.", "gauge");
        for (ch, bot) in &bots {
            for s in Status::ALL {
                labels.clear();
                labels.push_str(ch);
                labels.push_str(",status=\"");
                labels.push_str(s.as_str());
                labels.push('"');
                sample(out, "kissbot_bot_status", &labels, f64::from(u8::from(bot.status == s)));
            }
        }
        header(out, "kissbot_bot_info", "Bot metadata; always 1.", "gauge");
        for (ch, bot) in &bots {
            labels.clear();
            labels.push_str(ch);
            labels.push_str(",pid=\"");
            labels.push_str(itoa::Buffer::new().format(bot.pid));
            labels.push('"');
            sample(out, "kissbot_bot_info", &labels, 1.0);
        }
    }
    if bots.iter().any(|(_, b)| !b.features.is_empty()) {
        header(out, "kissbot_bot_feature_enabled", "1 if the bot reported the feature enabled.", "gauge");
        for (ch, bot) in &bots {
            for (f, on) in &bot.features {
                labels.clear();
                labels.push_str(ch);
                labels.push_str(",feature=\"");
                labels.push_str(&escape(f));
                labels.push('"');
                sample(out, "kissbot_bot_feature_enabled", &labels, f64::from(u8::from(*on)));
            }
        }
    }
    render_llm(state, out);
    render_budgets(state, out);
    header(out, "kissbot_exporter_bots", "Bots tracked by the exporter.", "gauge");
    sample(out, "kissbot_exporter_bots", "", state.bots.len() as f64);
}

/// The budget and spend gauges of the bots with a budget: one series per
/// (channel, period) the budget sets. Nothing without `--budgets.file`.
fn render_budgets(state: &Snapshot, out: &mut Body<'_>) {
    type Get = fn(&BudgetLine, Period) -> Option<f64>;
    let families: [(&str, &str, Get); 2] = [
        (
            "kissbot_llm_budget_usd",
            "LLM budget of the bot in USD for the current UTC day or month (--budgets.file).",
            |l, p| l.budget.of(p),
        ),
        (
            "kissbot_llm_spend_usd",
            "LLM spend of the bot in USD since the current UTC day or month began; only for bots with a budget.",
            |l, p| l.budget.of(p).map(|_| l.spend.of(p)),
        ),
    ];
    let mut labels = String::with_capacity(128);
    for (name, help, get) in families {
        let mut first = true;
        for line in &state.budgets {
            for period in Period::ALL {
                let Some(v) = get(line, period) else { continue };
                if first {
                    header(out, name, help, "gauge");
                    first = false;
                }
                labels.clear();
                let _ = write!(labels, "channel=\"{}\",period=\"{}\"", escape(&line.channel), period.as_str());
                sample(out, name, &labels, v);
            }
        }
    }
}

fn render_llm(state: &Snapshot, out: &mut Body<'_>) {
    let mut series: Vec<_> = state
        .llm
        .iter()
        .map(|((c, m, f), s)| {
            (format!("channel=\"{}\",model=\"{}\",feature=\"{}\"", escape(c), escape(m), escape(f)), s)
        })
        .collect();
    series.sort_by(|a, b| a.0.cmp(&b.0));
    let families: [LlmFamily<'_>; 4] = [
        ("kissbot_llm_requests_total", "LLM calls.", &|s| s.requests as f64),
        ("kissbot_llm_input_tokens_total", "LLM prompt tokens.", &|s| s.input_tokens as f64),
        ("kissbot_llm_output_tokens_total", "LLM completion tokens.", &|s| s.output_tokens as f64),
        ("kissbot_llm_cached_input_tokens_total", "LLM prompt tokens served from the provider's cache.", &|s| {
            s.cached_tokens as f64
        }),
    ];
    if !series.is_empty() {
        for (name, help, get) in families {
            header(out, name, help, "counter");
            for (labels, s) in &series {
                sample(out, name, labels, get(s));
            }
        }
    }
    if !series.is_empty() {
        let name = "kissbot_llm_cost_usd_total";
        header(
            out,
            name,
            "LLM cost in USD by source: reported by the bot, a price table entry, or the fallback price for unknown models.",
            "counter",
        );
        let mut labels = String::with_capacity(256);
        for (base, s) in &series {
            for (source, cost) in CostSource::LABELS.iter().zip(s.cost_usd) {
                let Some(cost) = cost else { continue };
                labels.clear();
                labels.push_str(base);
                labels.push_str(",cost_source=\"");
                labels.push_str(source);
                labels.push('"');
                sample(out, name, &labels, cost);
            }
        }
    }
    if !series.is_empty() {
        // Six error types for every series would multiply this family by
        // six for fleets that rarely fail: `other` is there from a series'
        // first call (0 until an error), so sums and ratios have data from
        // the start, and each other type appears at its first error.
        let name = "kissbot_llm_errors_total";
        header(out, name, "LLM calls the bot reported as failed, by error type.", "counter");
        let mut labels = String::with_capacity(256);
        for (base, s) in &series {
            for t in ErrorType::ALL {
                let n = s.errors[t as usize];
                if n == 0 && t != ErrorType::Other {
                    continue;
                }
                labels.clear();
                labels.push_str(base);
                labels.push_str(",error_type=\"");
                labels.push_str(t.as_str());
                labels.push('"');
                sample(out, name, &labels, n as f64);
            }
        }
    }
    let mut unpriced: BTreeMap<&str, u64> = BTreeMap::new();
    for ((_, model, _), s) in &state.llm {
        if s.unpriced > 0 {
            *unpriced.entry(model.as_str()).or_default() += s.unpriced;
        }
    }
    if !unpriced.is_empty() {
        let name = "kissbot_llm_unpriced_requests_total";
        header(
            out,
            name,
            "LLM calls priced neither by the bot nor by a price table entry (fallback price or none), by model.",
            "counter",
        );
        for (model, n) in unpriced {
            sample(out, name, &format!("model=\"{}\"", escape(model)), n as f64);
        }
    }
    render_histograms(
        out,
        "kissbot_llm_request_duration_seconds",
        "LLM call latency as reported by the bot.",
        &state.latencies,
    );
    render_histograms(
        out,
        "kissbot_llm_time_to_first_token_seconds",
        "Time to the first token of LLM calls, as reported by the bot.",
        &state.ttfts,
    );
}

/// Renders one histogram family of [`LATENCY_BUCKETS`] by (channel, model).
fn render_histograms(out: &mut Body<'_>, name: &str, help: &str, histograms: &[((String, String), Latency)]) {
    let mut hists: Vec<_> = histograms
        .iter()
        .map(|((c, m), h)| (format!("channel=\"{}\",model=\"{}\"", escape(c), escape(m)), h))
        .collect();
    if hists.is_empty() {
        return;
    }
    hists.sort_by(|a, b| a.0.cmp(&b.0));
    header(out, name, help, "histogram");
    let (bucket, sum, count) = (format!("{name}_bucket"), format!("{name}_sum"), format!("{name}_count"));
    // The `le` labels are the same for every histogram: formatted once.
    let bounds: Vec<String> = LATENCY_BUCKETS.iter().map(|ub| format!(",le=\"{ub}\"")).collect();
    let mut labels = String::with_capacity(256);
    for (base, h) in &hists {
        let mut cumulative = 0;
        for (i, (le, n)) in bounds.iter().zip(h.buckets.iter()).enumerate() {
            cumulative += n;
            labels.clear();
            labels.push_str(base);
            labels.push_str(le);
            sample(out, &bucket, &labels, cumulative as f64);
            exemplar(out, h, i);
        }
        labels.clear();
        labels.push_str(base);
        labels.push_str(",le=\"+Inf\"");
        sample(out, &bucket, &labels, h.count as f64);
        exemplar(out, h, LATENCY_BUCKETS.len());
        sample(out, &sum, base, h.sum);
        sample(out, &count, base, h.count as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Exemplar, Latency};

    #[test]
    fn openmetrics_rendering() {
        let m = Metrics::new().unwrap();
        let mut latency = Latency::default();
        latency.buckets[4] = 2;
        latency.buckets[LATENCY_BUCKETS.len()] = 1;
        latency.sum = 401.5;
        latency.count = 3;
        latency.exemplar =
            Some(Exemplar { bucket: 4, label: ExemplarLabel::UsageId(42), value: 0.75, timestamp: 1796000000.5 });
        let mut snapshot =
            Snapshot { latencies: vec![(("a".into(), "m".into()), latency.clone())], ..Snapshot::default() };
        let mut om = String::new();
        m.render_openmetrics_into(&snapshot, 0.0, &mut om);
        assert!(om.ends_with("\nkissbot_exporter_bots 0\n# EOF\n"), "{om}");
        assert!(om.contains(
            "\nkissbot_llm_request_duration_seconds_bucket{channel=\"a\",model=\"m\",le=\"1\"} 2 # {llm_usage_id=\"42\"} 0.75 1796000000.5\n"
        ));
        assert_eq!(om.matches(" # {").count(), 1, "{om}");
        assert!(om.contains("# TYPE kissbot_exporter_messages_rejected counter\n"));
        assert!(om.contains("\nkissbot_exporter_messages_rejected_total{reason=\"invalid_json\"} 0\n"));
        let mut text = String::new();
        m.render_into(&snapshot, 0.0, &mut text);
        assert!(!text.contains(" # {") && !text.contains("# EOF"));
        // The same families and samples, but for the exemplar and the names
        // of counter families (the process's own figures change between
        // the two renders).
        let strip = |body: &str| -> Vec<String> {
            body.lines()
                .filter(|l| !l.starts_with('#') && !l.starts_with("process_"))
                .map(|l| l.split(" # ").next().unwrap_or(l).to_owned())
                .collect()
        };
        assert_eq!(strip(&om), strip(&text));
        // A trace id names the call instead; on the +Inf bucket too.
        latency.exemplar = Some(Exemplar {
            bucket: LATENCY_BUCKETS.len(),
            label: ExemplarLabel::TraceId("t-1".into()),
            value: 400.0,
            timestamp: 1.0,
        });
        snapshot.latencies[0].1 = latency;
        om.clear();
        m.render_openmetrics_into(&snapshot, 0.0, &mut om);
        assert!(om.contains("le=\"+Inf\"} 3 # {trace_id=\"t-1\"} 400 1\n"), "{om}");
    }

    #[test]
    fn the_registry_holds_only_counters_and_gauges() {
        // `encode_openmetrics` writes no other kind.
        use prometheus::proto::MetricType;
        for mf in Metrics::new().unwrap().registry.gather() {
            assert!(matches!(mf.get_field_type(), MetricType::COUNTER | MetricType::GAUGE), "{}", mf.name());
        }
    }

    #[test]
    fn escapes_label_values() {
        assert_eq!(escape("plain"), "plain");
        assert_eq!(escape("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }

    #[test]
    fn values_in_text_format() {
        let mut s = String::new();
        for v in [1.0, 0.00957, 1795438355.6061244, f64::INFINITY, f64::NAN] {
            value(&mut s, v);
            s.push(' ');
        }
        assert_eq!(s, "1 0.00957 1795438355.6061244 +Inf NaN ");
    }
}
