//! Bots that crashed or hung keep their series — and their alerts — past
//! `--bot.expiry`, while a bot that unregistered expires; an operator can
//! forget a broken bot, and spend sums do not fall when a bot goes. With the
//! real binary, a real socket, a real bot process, real SQLite and real
//! scrapes; the expiry is 2 s, so "past the expiry" takes seconds.
//!
//! 1. `broken_bots_outlive_the_expiry_until_forgotten`: the exporter alone
//!    (series, landing page, spend, the forget endpoint, the database, a
//!    restart).
//! 2. `alerts_for_broken_bots_outlive_the_expiry_in_alertmanager`: the same
//!    fleet scraped by a real Prometheus with the repository's rules, sending
//!    to a real Alertmanager. Prints `SKIP:` without `prometheus` and
//!    `alertmanager` on `PATH`, and fails instead under `CI`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::bundle_support::{strict, which};
use crate::common::{metric_value, python_bot_then, wait_until, Exporter};
use crate::servers::{
    alertmanager_alerts, find_alert, free_addr, poll, start_alertmanager, start_bundle_prometheus, Server,
};

/// The bot whose process exits without unregistering: `dead`.
const CRASHED: &str = "crashed";
/// The bot that stops sending heartbeats: `stale`. Its pid is not the
/// sender's, so the exporter cannot sample it, as for a bot in a container.
const HUNG: &str = "hung";
const HUNG_PID: u32 = 4_100_001;
/// The bot that unregisters cleanly: `offline`, and gone after the expiry.
const LEFT: &str = "left";
/// The expiry the exporter runs with, in seconds.
const EXPIRY_SECONDS: f64 = 2.0;

/// Every bot's `*` budget, so every bot has spend series.
const BUDGETS: &str = "[[budget]]\nchannel = \"*\"\ndaily_usd = 100.0\nmonthly_usd = 1000.0\n";

fn start(dir: &Path, lifecycle: bool) -> Exporter {
    let budgets = dir.join("budgets.toml");
    std::fs::write(&budgets, BUDGETS).expect("write the budgets file");
    let mut args = vec![
        format!("--bot.expiry={EXPIRY_SECONDS}s"),
        "--heartbeat.stale-after=1s".to_owned(),
        "--sampler.interval=200ms".to_owned(),
        format!("--budgets.file={}", budgets.display()),
    ];
    if lifecycle {
        args.push("--web.enable-lifecycle".to_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Exporter::start_in(dir, &args)
}

fn status(channel: &str, status: &str) -> String {
    format!(r#"kissbot_bot_status{{channel="{channel}",status="{status}"}}"#)
}

fn spend_today(channel: &str) -> String {
    format!(r#"kissbot_llm_spend_usd{{channel="{channel}",period="day"}}"#)
}

fn llm_call(channel: &str, cost: f64) -> String {
    format!(
        r#"{{"type": "llm_usage", "channel": "{channel}", "model": "gpt-4o", "feature": "chat", "tokens_in": 10, "tokens_out": 10, "cost_usd": {cost}}}"#
    )
}

/// The fleet: a real bot process that crashes, a bot that hangs, a bot that
/// spends and unregisters. Returns once the three are dead, stale and
/// offline.
fn make_fleet(e: &Exporter) {
    let mut bot = python_bot_then(&e.socket, CRASHED, "");
    // Reaped, so the sampler finds no process at all (a zombie would count
    // as gone too).
    bot.wait().expect("the bot process exits");
    e.send(&format!(r#"{{"type": "heartbeat", "channel": "{HUNG}", "pid": {HUNG_PID}}}"#));
    e.send(&format!(r#"{{"type": "register", "channel": "{LEFT}", "pid": 4100002}}"#));
    e.wait_metric(&status(LEFT, "online"), 1.0);
    for (channel, cost) in [(CRASHED, 0.25), (HUNG, 0.5), (LEFT, 1.25)] {
        e.send(&llm_call(channel, cost));
    }
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 3.0);
    e.send(&format!(r#"{{"type": "unregister", "channel": "{LEFT}", "pid": 4100002}}"#));
    e.wait_metric(&status(CRASHED, "dead"), 1.0);
    e.wait_metric(&status(HUNG, "stale"), 1.0);
    e.wait_metric(&status(LEFT, "offline"), 1.0);
}

/// The bots of `/api/bots` by channel, and the fleet's spend today.
fn api_bots(e: &Exporter) -> (std::collections::BTreeMap<String, Value>, Value) {
    let (code, _, body) = e.get("/api/bots");
    assert_eq!(code, 200);
    let v: Value = serde_json::from_slice(&body).expect("JSON");
    let bots = v["bots"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|b| (b["channel"].as_str().expect("a channel").to_owned(), b.clone()))
        .collect();
    (bots, v["spend_today_usd_total"].clone())
}

fn post(e: &Exporter, path: &str) -> (u16, Value) {
    let (code, _, body) = e.request("POST", path, &[]);
    (code, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn events(e: &Exporter, channel: &str) -> Vec<String> {
    let db = e.db();
    let mut stmt = db.prepare("SELECT event FROM bot_events WHERE channel = ?1 ORDER BY id").expect("prepare");
    stmt.query_map([channel], |r| r.get(0)).expect("query").map(|r| r.expect("row")).collect()
}

#[test]
fn broken_bots_outlive_the_expiry_until_forgotten() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut e = start(tmp.path(), true);
    make_fleet(&e);
    let spent = |m: &str| metric_value(m, &spend_today(LEFT));

    // The offline bot expires after 2 s...
    wait_until("the offline bot to expire", Duration::from_secs(15), || {
        metric_value(&e.scrape(), &status(LEFT, "offline")).is_none()
    });
    // ... and the broken bots stay, however long past the expiry: wait
    // until they have been broken for three expiries, and check at every
    // scrape meanwhile.
    wait_until("three expiries to pass", Duration::from_secs(30), || {
        let m = e.scrape();
        assert_eq!(metric_value(&m, &status(CRASHED, "dead")), Some(1.0), "the crashed bot vanished:\n{m}");
        assert_eq!(metric_value(&m, &status(HUNG, "stale")), Some(1.0), "the hung bot vanished:\n{m}");
        let (bots, _) = api_bots(&e);
        [CRASHED, HUNG].iter().all(|c| bots[*c]["status_age_seconds"].as_f64().unwrap_or(0.0) > 3.0 * EXPIRY_SECONDS)
    });
    let m = e.scrape();
    assert!(metric_value(&m, r#"kissbot_bot_heartbeat_age_seconds{channel="hung"}"#).unwrap_or(0.0) > 3.0);
    assert_eq!(metric_value(&m, "kissbot_exporter_bots"), Some(2.0));
    assert!(!m.contains(r#"kissbot_bot_up{channel="left"}"#), "no bot series of the expired bot:\n{m}");
    // Spend does not fall: the expired bot's spend series stays for the day,
    // and so does its share of the fleet's total.
    assert_eq!(spent(&m), Some(1.25), "the expired bot's spend series:\n{m}");
    let total: f64 = [CRASHED, HUNG, LEFT].iter().map(|c| metric_value(&m, &spend_today(c)).unwrap_or(0.0)).sum();
    assert_eq!(total, 2.0);
    let (bots, spend_total) = api_bots(&e);
    assert_eq!(bots.keys().collect::<Vec<_>>(), [CRASHED, HUNG]);
    assert_eq!(spend_total.as_f64(), Some(2.0), "today's spend of the whole fleet");
    // The landing page keeps them, worst first, and counts all of today's
    // spend.
    let (code, _, page) = e.get("/");
    assert_eq!(code, 200);
    let page = String::from_utf8(page).expect("UTF-8");
    let (dead_row, stale_row) = (page.find(r#"data-channel="crashed""#), page.find(r#"data-channel="hung""#));
    assert!(dead_row.is_some() && stale_row.is_some() && dead_row < stale_row, "{page}");
    assert!(page.contains(r#"id="t-spend">$2.00<"#), "{page}");

    // Forgetting: POST only, a known bot that is not online.
    let (code, _, _) = e.get(&format!("/api/bots/{CRASHED}/forget"));
    assert_eq!(code, 405);
    assert_eq!(post(&e, "/api/bots/nobody/forget").0, 404);
    e.send(r#"{"type": "register", "channel": "alive", "pid": 4100003}"#);
    e.wait_metric(&status("alive", "online"), 1.0);
    let (code, v) = post(&e, "/api/bots/alive/forget");
    assert_eq!(code, 409, "{v}");
    assert_eq!(post(&e, "/api/bots/%zz/forget").0, 400);
    let history_before = events(&e, CRASHED);
    assert_eq!(history_before, ["register", "dead"]);
    let (code, v) = post(&e, &format!("/api/bots/{CRASHED}/forget"));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v, serde_json::json!({"channel": CRASHED, "forgotten": true, "was": "dead"}));
    let m = e.scrape();
    assert!(!m.contains(r#"channel="crashed",status="#), "the forgotten bot's series end:\n{m}");
    assert_eq!(metric_value(&m, &spend_today(CRASHED)), Some(0.25), "its spend stays counted");
    assert_eq!(post(&e, &format!("/api/bots/{CRASHED}/forget")).0, 404, "forgotten already");
    // History keeps every row and gains one; bot_status says forgotten.
    wait_until("the forgotten rows", Duration::from_secs(10), || events(&e, CRASHED).len() == 3);
    assert_eq!(events(&e, CRASHED), ["register", "dead", "forgotten"]);
    wait_until("bot_status to say forgotten", Duration::from_secs(10), || {
        e.count("SELECT COUNT(*) FROM bot_status WHERE channel = 'crashed' AND status = 'forgotten'") == 1
    });

    // A restart restores the hung bot, long past the expiry, but neither the
    // forgotten one nor the expired offline one.
    assert!(e.terminate().success());
    let e = start(tmp.path(), true);
    let m = e.scrape();
    assert_eq!(metric_value(&m, &status(HUNG, "stale")), Some(1.0), "the hung bot is restored:\n{m}");
    assert!(!m.contains(r#"kissbot_bot_up{channel="crashed"}"#), "the forgotten bot is not:\n{m}");
    assert!(!m.contains(r#"kissbot_bot_up{channel="left"}"#), "the expired bot is not:\n{m}");
    // A forgotten bot that sends again is a bot again.
    e.send(&format!(r#"{{"type": "register", "channel": "{CRASHED}", "pid": 4100004}}"#));
    e.wait_metric(&status(CRASHED, "online"), 1.0);
    wait_until("bot_status to say online", Duration::from_secs(10), || {
        e.count("SELECT COUNT(*) FROM bot_status WHERE channel = 'crashed' AND status = 'online'") == 1
    });
}

#[test]
fn forgetting_needs_the_lifecycle_flag() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let e = start(tmp.path(), false);
    e.send(&format!(r#"{{"type": "heartbeat", "channel": "{HUNG}", "pid": {HUNG_PID}}}"#));
    e.wait_metric(&status(HUNG, "stale"), 1.0);
    let (code, _, body) = e.request("POST", &format!("/api/bots/{HUNG}/forget"), &[]);
    assert_eq!(code, 403, "{}", String::from_utf8_lossy(&body));
    assert_eq!(e.metric(&status(HUNG, "stale")), Some(1.0), "nothing was forgotten");
}

// ---------------------------------------------------------------------------
// 2. With real Prometheus and Alertmanager
// ---------------------------------------------------------------------------

/// The alerts whose `for:` the copy of the rules shortens to [`SHORT_FOR`].
const SHORTENED_FOR: &[&str] = &["KissBotHeartbeatStale", "KissBotDead"];
const SHORT_FOR: &str = "1s";

/// `(prometheus, alertmanager)`, or `None` after printing SKIP (a failure
/// under CI).
fn servers() -> Option<(PathBuf, PathBuf)> {
    let prometheus = which("prometheus");
    let alertmanager = which("prometheus-alertmanager").or_else(|| which("alertmanager"));
    if let (Some(p), Some(a)) = (&prometheus, &alertmanager) {
        return Some((p.clone(), a.clone()));
    }
    let msg = "prometheus or alertmanager not installed (apt-get install prometheus prometheus-alertmanager)";
    if strict() {
        panic!("{msg}; CI is set, so a missing tool fails the test");
    }
    eprintln!("SKIP: expiry_e2e: {msg}");
    None
}

/// Prometheus on deploy/prometheus/prometheus.yml, scraping and evaluating
/// every second, with the rules' copy in which [`SHORTENED_FOR`] fire fast.
fn start_prometheus(binary: &Path, exporter: std::net::SocketAddr, alertmanager: std::net::SocketAddr) -> Server {
    start_bundle_prometheus(binary, exporter, alertmanager, SHORTENED_FOR, SHORT_FOR)
}

/// The state of an alert in Prometheus (`pending`, `firing`), if it is there.
fn prometheus_alert(prom: &Server, alertname: &str, channel: &str) -> Result<Option<String>, String> {
    let v = prom.get_json("/api/v1/alerts")?;
    Ok(v["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["labels"]["alertname"] == alertname && a["labels"]["channel"] == channel)
        .map(|a| a["state"].as_str().unwrap_or("?").to_owned()))
}

/// Whether an alert is active in Alertmanager.
fn active_in_alertmanager(am: &Server, alertname: &str, channel: &str) -> Result<bool, String> {
    let alerts = alertmanager_alerts(am)?;
    Ok(find_alert(&alerts, alertname, Some(channel)).is_some_and(|a| a["@state"] == "active"))
}

#[test]
fn alerts_for_broken_bots_outlive_the_expiry_in_alertmanager() {
    let Some((prometheus_bin, alertmanager_bin)) = servers() else { return };
    let tmp = tempfile::tempdir().expect("temp dir");
    let e = start(tmp.path(), true);
    // No receiver listens there: the test reads Alertmanager's own API.
    let am = start_alertmanager(&alertmanager_bin, &format!("http://{}", free_addr()));
    let prom = start_prometheus(&prometheus_bin, e.addr, am.addr);
    make_fleet(&e);

    let broken = [("KissBotDead", CRASHED), ("KissBotHeartbeatStale", HUNG)];
    for (alert, channel) in broken {
        poll(&format!("{alert} for {channel} in Alertmanager"), Duration::from_secs(60), || {
            active_in_alertmanager(&am, alert, channel)?.then_some(()).ok_or_else(|| format!("{alert} not active"))
        });
    }
    let fired = Instant::now();
    // Five expiries later — the offline bot long gone — both still fire, in
    // Prometheus and in Alertmanager, at every look.
    wait_until("the offline bot to expire", Duration::from_secs(15), || {
        metric_value(&e.scrape(), &status(LEFT, "offline")).is_none()
    });
    let mut looks = 0;
    wait_until("five expiries of firing alerts", Duration::from_secs(60), || {
        for (alert, channel) in broken {
            let state = prometheus_alert(&prom, alert, channel).expect("Prometheus alerts");
            assert_eq!(state.as_deref(), Some("firing"), "{alert} for {channel} after {:?}", fired.elapsed());
            assert!(active_in_alertmanager(&am, alert, channel).expect("Alertmanager alerts"), "{alert} resolved");
        }
        looks += 1;
        fired.elapsed().as_secs_f64() > 5.0 * EXPIRY_SECONDS
    });
    assert!(looks > 1);

    // Forgotten: KissBotDead resolves; the hung bot's alert stays.
    let (code, v) = post(&e, &format!("/api/bots/{CRASHED}/forget"));
    assert_eq!(code, 200, "{v}");
    poll("KissBotDead for the forgotten bot to resolve", Duration::from_secs(60), || {
        match (prometheus_alert(&prom, "KissBotDead", CRASHED)?, active_in_alertmanager(&am, "KissBotDead", CRASHED)?) {
            (None, false) => Ok(()),
            other => Err(format!("still {other:?}")),
        }
    });
    assert_eq!(prometheus_alert(&prom, "KissBotHeartbeatStale", HUNG).expect("alerts").as_deref(), Some("firing"));
    // The hung bot comes back (and keeps sending): its alert resolves too.
    poll("KissBotHeartbeatStale to resolve", Duration::from_secs(60), || {
        e.send(&format!(r#"{{"type": "heartbeat", "channel": "{HUNG}", "pid": {HUNG_PID}}}"#));
        match prometheus_alert(&prom, "KissBotHeartbeatStale", HUNG)? {
            None => Ok(()),
            Some(state) => Err(format!("still {state}")),
        }
    });
}
