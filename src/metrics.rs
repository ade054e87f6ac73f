//! The Prometheus side: the exporter's own metrics and a collector that
//! renders the per-bot and LLM series from the live [`State`] at scrape time.
//!
//! Rendering from the state (instead of keeping a labelled metric per bot)
//! means a bot that is forgotten leaves no ghost series behind, and the
//! heartbeat age is computed at the instant of the scrape. Nothing here does
//! I/O.

use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use prometheus::Gauge as GaugeMetric;

use crate::event::Reason;
use crate::state::{State, Status, LATENCY_BUCKETS};
use crate::store::unix_now;

/// The exporter's own metrics, registered in [`Metrics::registry`].
#[derive(Clone)]
pub struct Metrics {
    /// The registry that `/metrics` renders.
    pub registry: Registry,
    /// Accepted messages by type.
    pub messages: IntCounterVec,
    /// Rejected lines by reason.
    pub rejected: IntCounterVec,
    /// Socket connections accepted.
    pub connections: IntCounter,
    /// Socket connections open now.
    pub connections_active: IntGauge,
    /// Socket connections refused, by reason.
    pub connections_rejected: IntCounterVec,
    /// Rows waiting for the writer.
    pub queue_depth: IntGauge,
    /// Capacity of the writer queue.
    pub queue_capacity: IntGauge,
    /// Rows not written, by reason.
    pub events_dropped: IntCounterVec,
    /// Rows committed to SQLite.
    pub db_rows_written: IntCounter,
    /// Failed SQLite transactions.
    pub db_write_errors: IntCounter,
    /// 1 while the last database write succeeded.
    pub db_up: IntGauge,
    /// Values cut to a cardinality limit, by label.
    pub label_overflow: IntCounterVec,
    /// Messages whose pid is not the sending process.
    pub peer_pid_mismatches: IntCounter,
    /// Pricing reloads by outcome (`success`, `failure`).
    pub config_reloads: IntCounterVec,
    /// 1 if the last pricing (re)load succeeded.
    pub config_last_reload_successful: IntGauge,
    /// Duration of the last sampler pass.
    pub sampler_duration: GaugeMetric,
    /// Unix time of the last completed sampler pass.
    pub sampler_last_success: GaugeMetric,
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
            peer_pid_mismatches: IntCounter::with_opts(opts(
                "kissbot_exporter_peer_pid_mismatches_total",
                "Messages whose pid is not the pid of the process that sent them (possible spoofing).",
            ))?,
            config_reloads: IntCounterVec::new(
                opts("kissbot_exporter_config_reloads_total", "Pricing file reloads, by outcome."),
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
        for t in ["register", "heartbeat", "unregister", "llm_usage"] {
            m.messages.with_label_values(&[t]);
        }
        for r in ["queue_full", "writer_stopped", "db_error"] {
            m.events_dropped.with_label_values(&[r]);
        }
        for l in ["channel", "llm_series", "length"] {
            m.label_overflow.with_label_values(&[l]);
        }
        m.connections_rejected.with_label_values(&["limit"]);
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
        r.register(Box::new(m.queue_depth.clone()))?;
        r.register(Box::new(m.queue_capacity.clone()))?;
        r.register(Box::new(m.events_dropped.clone()))?;
        r.register(Box::new(m.db_rows_written.clone()))?;
        r.register(Box::new(m.db_write_errors.clone()))?;
        r.register(Box::new(m.db_up.clone()))?;
        r.register(Box::new(m.label_overflow.clone()))?;
        r.register(Box::new(m.peer_pid_mismatches.clone()))?;
        r.register(Box::new(m.config_reloads.clone()))?;
        r.register(Box::new(m.config_last_reload_successful.clone()))?;
        r.register(Box::new(m.sampler_duration.clone()))?;
        r.register(Box::new(m.sampler_last_success.clone()))?;
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(m)
    }

    /// Registers the collector of per-bot and LLM series over `state`.
    pub fn register_state(&self, state: Arc<Mutex<State>>) -> prometheus::Result<()> {
        self.registry.register(Box::new(StateCollector::new(state)?))
    }

    /// Renders every metric in the Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(64 * 1024);
        // Encoding into a String cannot fail: the families come from our own
        // collectors and every one has at least one metric.
        let _ = prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out);
        out
    }
}

/// The families rendered from the state: (name, help, type, label names).
const FAMILIES: &[(&str, &str, MetricType, &[&str])] = &[
    ("kissbot_bot_up", "1 if the bot is online, 0 otherwise.", MetricType::GAUGE, &["channel"]),
    (
        "kissbot_bot_status",
        "Bot state as a state set: 1 for the current state.",
        MetricType::GAUGE,
        &["channel", "status"],
    ),
    (
        "kissbot_bot_last_heartbeat_timestamp_seconds",
        "Unix time of the last heartbeat or register.",
        MetricType::GAUGE,
        &["channel"],
    ),
    (
        "kissbot_bot_heartbeat_age_seconds",
        "Seconds since the last heartbeat, at scrape time.",
        MetricType::GAUGE,
        &["channel"],
    ),
    (
        "kissbot_bot_registered_timestamp_seconds",
        "Unix time the current bot process registered.",
        MetricType::GAUGE,
        &["channel"],
    ),
    ("kissbot_bot_heartbeats_total", "Heartbeats received.", MetricType::COUNTER, &["channel"]),
    ("kissbot_bot_restarts_total", "Restarts seen (a new pid for the channel).", MetricType::COUNTER, &["channel"]),
    ("kissbot_bot_info", "Bot metadata; always 1.", MetricType::GAUGE, &["channel", "pid"]),
    (
        "kissbot_bot_feature_enabled",
        "1 if the bot reported the feature enabled.",
        MetricType::GAUGE,
        &["channel", "feature"],
    ),
    ("kissbot_llm_requests_total", "LLM calls.", MetricType::COUNTER, &["channel", "model", "feature"]),
    ("kissbot_llm_input_tokens_total", "LLM prompt tokens.", MetricType::COUNTER, &["channel", "model", "feature"]),
    (
        "kissbot_llm_output_tokens_total",
        "LLM completion tokens.",
        MetricType::COUNTER,
        &["channel", "model", "feature"],
    ),
    (
        "kissbot_llm_cost_usd_total",
        "LLM cost in USD: reported by the bot, else from the price table.",
        MetricType::COUNTER,
        &["channel", "model", "feature"],
    ),
    (
        "kissbot_llm_unpriced_requests_total",
        "LLM calls that could not be priced, by model.",
        MetricType::COUNTER,
        &["model"],
    ),
    (
        "kissbot_llm_request_duration_seconds",
        "LLM call latency as reported by the bot.",
        MetricType::HISTOGRAM,
        &["channel", "model"],
    ),
    ("kissbot_exporter_bots", "Bots tracked by the exporter.", MetricType::GAUGE, &[]),
    (
        "kissbot_bot_process_alive",
        "1 if the bot's process runs, 0 if it is gone; absent when its pid is not visible.",
        MetricType::GAUGE,
        &["channel"],
    ),
    (
        "kissbot_bot_cpu_seconds_total",
        "CPU time used by the bot's processes while tracked.",
        MetricType::COUNTER,
        &["channel"],
    ),
    ("kissbot_bot_resident_memory_bytes", "Resident memory of the bot's process.", MetricType::GAUGE, &["channel"]),
    ("kissbot_bot_virtual_memory_bytes", "Virtual memory of the bot's process.", MetricType::GAUGE, &["channel"]),
    (
        "kissbot_bot_process_start_time_seconds",
        "Start time of the bot's process, Unix seconds.",
        MetricType::GAUGE,
        &["channel"],
    ),
    (
        "kissbot_llm_errors_total",
        "LLM calls the bot reported as failed.",
        MetricType::COUNTER,
        &["channel", "model", "feature"],
    ),
    (
        "kissbot_llm_cached_input_tokens_total",
        "LLM prompt tokens served from the provider's cache.",
        MetricType::COUNTER,
        &["channel", "model", "feature"],
    ),
];

struct StateCollector {
    state: Arc<Mutex<State>>,
    descs: Vec<Desc>,
}

impl StateCollector {
    fn new(state: Arc<Mutex<State>>) -> prometheus::Result<StateCollector> {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, _, labels)| {
                Desc::new(
                    (*name).into(),
                    (*help).into(),
                    labels.iter().map(|l| (*l).to_owned()).collect(),
                    Default::default(),
                )
            })
            .collect::<prometheus::Result<Vec<_>>>()?;
        Ok(StateCollector { state, descs })
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(n, v)| {
            let mut l = LabelPair::default();
            l.set_name((*n).to_owned());
            l.set_value((*v).to_owned());
            l
        })
        .collect()
}

fn gauge(pairs: &[(&str, &str)], v: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(v);
    let mut m = Metric::from_gauge(g);
    m.set_label(labels(pairs));
    m
}

fn counter(pairs: &[(&str, &str)], v: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(v);
    let mut m = Metric::from_label(labels(pairs));
    m.set_counter(c);
    m
}

impl Collector for StateCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = unix_now();
        let mut fams: Vec<Vec<Metric>> = FAMILIES.iter().map(|_| Vec::new()).collect();
        {
            // A poisoned lock means a panic while mutating; the data is still
            // the best we have, so keep serving it rather than going dark.
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            for bot in state.bots() {
                let ch = bot.channel.as_str();
                let c = [("channel", ch)];
                fams[0].push(gauge(&c, f64::from(u8::from(bot.status == Status::Online))));
                for s in Status::ALL {
                    fams[1]
                        .push(gauge(&[("channel", ch), ("status", s.as_str())], f64::from(u8::from(bot.status == s))));
                }
                fams[2].push(gauge(&c, bot.last_heartbeat));
                fams[3].push(gauge(&c, (now - bot.last_heartbeat).max(0.0)));
                fams[4].push(gauge(&c, bot.registered_at));
                fams[5].push(counter(&c, bot.heartbeats as f64));
                fams[6].push(counter(&c, bot.restarts as f64));
                fams[7].push(gauge(&[("channel", ch), ("pid", &bot.pid.to_string())], 1.0));
                for (f, on) in &bot.features {
                    fams[8].push(gauge(&[("channel", ch), ("feature", f)], f64::from(u8::from(*on))));
                }
                if let Some(p) = bot.process {
                    fams[16].push(gauge(&c, f64::from(u8::from(p.alive))));
                    fams[17].push(counter(&c, State::cpu_seconds_total(bot)));
                    if p.start_time > 0 {
                        fams[18].push(gauge(&c, p.rss_bytes as f64));
                        fams[19].push(gauge(&c, p.vms_bytes as f64));
                        fams[20].push(gauge(&c, p.start_time as f64));
                    }
                }
            }
            let mut unpriced: std::collections::HashMap<&str, u64> = Default::default();
            for ((ch, model, feature), s) in state.llm_series() {
                let l = [("channel", ch.as_str()), ("model", model.as_str()), ("feature", feature.as_str())];
                fams[9].push(counter(&l, s.requests as f64));
                fams[10].push(counter(&l, s.input_tokens as f64));
                fams[11].push(counter(&l, s.output_tokens as f64));
                fams[12].push(counter(&l, s.cost_usd));
                fams[21].push(counter(&l, s.errors as f64));
                fams[22].push(counter(&l, s.cached_tokens as f64));
                if s.unpriced > 0 {
                    *unpriced.entry(model.as_str()).or_default() += s.unpriced;
                }
            }
            for (model, n) in unpriced {
                fams[13].push(counter(&[("model", model)], n as f64));
            }
            for ((ch, model), h) in state.latencies() {
                let mut hist = Histogram::default();
                hist.set_sample_count(h.count);
                hist.set_sample_sum(h.sum);
                let mut cumulative = 0;
                let buckets = LATENCY_BUCKETS
                    .iter()
                    .zip(h.buckets.iter())
                    .map(|(ub, n)| {
                        cumulative += n;
                        let mut b = Bucket::default();
                        b.set_upper_bound(*ub);
                        b.set_cumulative_count(cumulative);
                        b
                    })
                    .collect();
                hist.set_bucket(buckets);
                let mut m = Metric::from_label(labels(&[("channel", ch), ("model", model)]));
                m.set_histogram(hist);
                fams[14].push(m);
            }
            fams[15].push(gauge(&[], state.bot_count() as f64));
        }
        FAMILIES
            .iter()
            .zip(fams)
            .map(|((name, help, kind, _), metrics)| {
                let mut f = MetricFamily::default();
                f.set_name((*name).to_owned());
                f.set_help((*help).to_owned());
                f.set_field_type(*kind);
                f.set_metric(metrics);
                f
            })
            .collect()
    }
}
