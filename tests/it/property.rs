//! Property tests: the parser and the framer never panic, and the real state
//! machine, rendered as metrics, matches a simple reference model over random
//! sequences of messages and time.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use kissbot_exporter::testing::Framer;
use kissbot_exporter::testing::Metrics;
use kissbot_exporter::testing::PriceTable;
use kissbot_exporter::testing::{parse_line, Event, LlmUsage};
use kissbot_exporter::testing::{OverflowCounters, State, StateConfig};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn parser_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_line(&bytes);
    }

    #[test]
    fn parser_never_panics_on_json_like_text(
        s in r#"\{("(type|channel|pid|model|feature|tokens_in|tokens_out|latency_ms|cost_usd|features|status|tokens_cached)"\s*:\s*(-?[0-9]{1,25}(\.[0-9]+)?(e[0-9]{1,4})?|"[a-z_é\\"]{0,8}"|true|null|\[\]|\{\}|\{"x":true\}),?){0,8}\}"#
    ) {
        let _ = parse_line(s.as_bytes());
    }

    #[test]
    fn framer_returns_exactly_the_short_lines(
        lines in proptest::collection::vec(proptest::collection::vec(1u8..=255, 0..40), 0..20),
        cuts in proptest::collection::vec(0usize..64, 0..20),
    ) {
        // Build a stream of lines (no newline inside), cut it at random points.
        let lines: Vec<Vec<u8>> = lines.into_iter().map(|l| l.into_iter().filter(|b| *b != b'\n').collect()).collect();
        let mut stream = Vec::new();
        for l in &lines {
            stream.extend_from_slice(l);
            stream.push(b'\n');
        }
        let max = 24;
        let mut f = Framer::new(max);
        let (mut got, mut long) = (Vec::new(), 0);
        let mut rest = &stream[..];
        let mut cuts = cuts.into_iter();
        while !rest.is_empty() {
            let n = cuts.next().unwrap_or(rest.len()).clamp(1, rest.len());
            let frames = f.push(&rest[..n]);
            got.extend(frames.lines.iter().map(|l| l.to_vec()));
            long += frames.too_long;
            rest = &rest[n..];
        }
        let want: Vec<Vec<u8>> = lines.iter().filter(|l| l.len() <= max).cloned().collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(long, lines.iter().filter(|l| l.len() > max).count());
        prop_assert_eq!(f.finish(), None);
    }
}

const STALE: f64 = 90.0;
const EXPIRY: f64 = 300.0;

#[derive(Debug, Clone)]
enum Op {
    Register(u8, u32),
    Heartbeat(u8, u32),
    Unregister(u8, u32),
    Llm(u8, u8, u32),
    Advance(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4, 1u32..4).prop_map(|(c, p)| Op::Register(c, p)),
        (0u8..4, 1u32..4).prop_map(|(c, p)| Op::Heartbeat(c, p)),
        (0u8..4, 1u32..4).prop_map(|(c, p)| Op::Unregister(c, p)),
        (0u8..4, 0u8..2, 0u32..1000).prop_map(|(c, m, t)| Op::Llm(c, m, t)),
        (1u16..200).prop_map(Op::Advance),
    ]
}

#[derive(Debug, Clone, PartialEq)]
struct RefBot {
    pid: u32,
    status: &'static str,
    heartbeats: u64,
    restarts: u64,
    last: f64,
    since: f64,
}

/// The reference: the documented rules, written as plainly as possible.
#[derive(Default)]
struct Model {
    bots: BTreeMap<String, RefBot>,
    llm: BTreeMap<(String, String), (u64, u64, f64)>,
}

impl Model {
    fn set(b: &mut RefBot, status: &'static str, now: f64) {
        if b.status != status {
            b.status = status;
            b.since = now;
        }
    }

    fn seen(&mut self, ch: &str, pid: u32, now: f64, heartbeat: bool) {
        match self.bots.get_mut(ch) {
            None => {
                let hb = u64::from(heartbeat);
                self.bots.insert(
                    ch.into(),
                    RefBot { pid, status: "online", heartbeats: hb, restarts: 0, last: now, since: now },
                );
            }
            Some(b) => {
                if b.pid != pid {
                    b.restarts += 1;
                    b.pid = pid;
                }
                b.heartbeats += u64::from(heartbeat);
                b.last = now;
                Model::set(b, "online", now);
            }
        }
    }

    fn apply(&mut self, op: &Op, now: &mut f64) {
        match *op {
            Op::Register(c, p) => self.seen(&format!("c{c}"), p, *now, false),
            Op::Heartbeat(c, p) => self.seen(&format!("c{c}"), p, *now, true),
            Op::Unregister(c, p) => {
                if let Some(b) = self.bots.get_mut(&format!("c{c}")) {
                    if b.pid == p {
                        b.last = *now;
                        Model::set(b, "offline", *now);
                    }
                }
            }
            Op::Llm(c, m, t) => {
                let e = self.llm.entry((format!("c{c}"), format!("m{m}"))).or_insert((0, 0, *now));
                e.0 += 1;
                e.1 += u64::from(t);
                e.2 = *now;
            }
            Op::Advance(s) => {
                *now += f64::from(s);
                let now = *now;
                for b in self.bots.values_mut() {
                    if b.status == "online" && now - b.last > STALE {
                        Model::set(b, "stale", now);
                    }
                }
                // Only a bot that unregistered expires: a stale one may be
                // hung, and keeps its series (and alerts) until it is back.
                self.bots.retain(|_, b| b.status != "offline" || now - b.since <= EXPIRY);
                let bots = &self.bots;
                self.llm.retain(|(c, _), v| bots.contains_key(c) || now - v.2 <= EXPIRY);
            }
        }
    }
}

fn event(op: &Op) -> Option<Event> {
    Some(match *op {
        Op::Register(c, p) => Event::Register { channel: format!("c{c}"), pid: p, features: vec![] },
        Op::Heartbeat(c, p) => Event::Heartbeat { channel: format!("c{c}"), pid: p },
        Op::Unregister(c, p) => Event::Unregister { channel: format!("c{c}"), pid: p },
        Op::Llm(c, m, t) => Event::LlmUsage(LlmUsage {
            channel: format!("c{c}"),
            model: format!("m{m}"),
            feature: "f".into(),
            tokens_in: u64::from(t),
            tokens_out: 1,
            latency_ms: None,
            pid: None,
            reported_cost_usd: None,
            truncated: false,
            provider: None,
            tokens_cached: 0,
            error: false,
            trace_id: None,
            ttft_ms: None,
            error_type: None,
        }),
        Op::Advance(_) => return None,
    })
}

fn real() -> (Arc<Mutex<State>>, Metrics) {
    let metrics = Metrics::new().unwrap();
    let state = State::new(
        StateConfig {
            stale_after: STALE,
            expiry: EXPIRY,
            max_bots: 100,
            max_llm_series: 100,
            max_features_per_bot: 64,
        },
        PriceTable::builtin(),
        OverflowCounters {
            channel: metrics.label_overflow.with_label_values(&["channel"]),
            llm_series: metrics.label_overflow.with_label_values(&["llm_series"]),
            length: metrics.label_overflow.with_label_values(&["length"]),
            features: metrics.label_overflow.with_label_values(&["features"]),
            evicted: metrics.bots_evicted.clone(),
        },
    );
    let state = Arc::new(Mutex::new(state));
    (state, metrics)
}

/// Renders the metrics of `state` as a scrape would.
fn render(state: &Mutex<State>, metrics: &Metrics) -> String {
    let snapshot = state.lock().unwrap().snapshot();
    metrics.render(&snapshot, kissbot_exporter::testing::unix_now())
}

/// The bot and LLM series in a rendering, as `name{labels} value` lines.
fn series(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| l.starts_with("kissbot_bot_") || l.starts_with("kissbot_llm_"))
        .filter(|l| !l.contains("_timestamp_seconds") && !l.contains("_age_seconds"))
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_owned(), v.parse().unwrap())
        })
        .collect()
}

fn expected(m: &Model) -> HashMap<String, f64> {
    let mut e = HashMap::new();
    for (ch, b) in &m.bots {
        e.insert(format!("kissbot_bot_up{{channel=\"{ch}\"}}"), if b.status == "online" { 1.0 } else { 0.0 });
        for s in ["dead", "offline", "online", "stale"] {
            let v = if b.status == s { 1.0 } else { 0.0 };
            e.insert(format!("kissbot_bot_status{{channel=\"{ch}\",status=\"{s}\"}}"), v);
        }
        e.insert(format!("kissbot_bot_heartbeats_total{{channel=\"{ch}\"}}"), b.heartbeats as f64);
        e.insert(format!("kissbot_bot_restarts_total{{channel=\"{ch}\"}}"), b.restarts as f64);
        e.insert(format!("kissbot_bot_info{{channel=\"{ch}\",pid=\"{}\"}}", b.pid), 1.0);
    }
    for ((ch, model), (n, tin, _)) in &m.llm {
        let l = format!("{{channel=\"{ch}\",model=\"{model}\",feature=\"f\"}}");
        e.insert(format!("kissbot_llm_requests_total{l}"), *n as f64);
        e.insert(format!("kissbot_llm_input_tokens_total{l}"), *tin as f64);
        e.insert(format!("kissbot_llm_output_tokens_total{l}"), *n as f64);
        let errors = format!("{{channel=\"{ch}\",model=\"{model}\",feature=\"f\",error_type=\"other\"}}");
        e.insert(format!("kissbot_llm_errors_total{errors}"), 0.0);
        e.insert(format!("kissbot_llm_cached_input_tokens_total{l}"), 0.0);
        // No model of the reference is in the price table: every call is
        // priced at the fallback and counted as unpriced.
        *e.entry(format!("kissbot_llm_unpriced_requests_total{{model=\"{model}\"}}")).or_insert(0.0) += *n as f64;
    }
    e
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn state_matches_the_reference_model(ops in proptest::collection::vec(op(), 1..60)) {
        let (state, metrics) = real();
        let mut model = Model::default();
        let mut now = 1_000_000.0;
        let mut rows = Vec::new();
        for op in &ops {
            model.apply(op, &mut now);
            match event(op) {
                Some(ev) => {
                    let _ = state.lock().unwrap().apply(ev, now, None, &mut rows);
                }
                None => state.lock().unwrap().tick(now, &mut rows),
            }
            let mut got = series(&render(&state, &metrics));
            // Cost depends on the price table; it is covered elsewhere.
            got.retain(|k, _| !k.starts_with("kissbot_llm_cost_usd_total"));
            prop_assert_eq!(got, expected(&model), "after {:?}", op);
        }
        // Everyone leaves; after the expiry every series is gone again.
        let baseline = {
            let (s, m) = real();
            series(&render(&s, &m)).len()
        };
        for c in 0..4u8 {
            let pid = model.bots.get(&format!("c{c}")).map(|b| b.pid).unwrap_or(1);
            let _ = state.lock().unwrap().apply(Event::Unregister { channel: format!("c{c}"), pid }, now, None, &mut rows);
        }
        // Offline bots expire after EXPIRY (the unregister made every bot
        // offline, stale ones included).
        state.lock().unwrap().tick(now + EXPIRY + 1.0, &mut rows);
        let text = render(&state, &metrics);
        prop_assert_eq!(series(&text).len(), baseline, "series left behind:\n{}", text);
        prop_assert!(text.contains("kissbot_exporter_bots 0"));
    }
}
