//! LLM budgets end to end: the budget and spend gauges, spend read back from
//! the database after a restart (legacy time formats and rows without a cost
//! included), `/api/budgets`, and budgets files refused at start, by
//! `--check-config` and on reload.

use std::path::Path;
use std::process::{Command, Stdio};

use kissbot_exporter::testing::{format_time, unix_now, Period};

use crate::common::*;

const BUDGETS: &str = r#"
[[budget]]
channel = "el_serda"   # "*" = every bot without its own entry
daily_usd = 5.0        # UTC calendar day
monthly_usd = 100.0    # UTC calendar month

[[budget]]
channel = "*"
daily_usd = 1.0
monthly_usd = 20.0
"#;

fn close(a: Option<f64>, b: f64) -> bool {
    a.is_some_and(|a| (a - b).abs() < 1e-9)
}

fn spend(e: &Exporter, channel: &str, period: &str) -> Option<f64> {
    e.metric(&format!(r#"kissbot_llm_spend_usd{{channel="{channel}",period="{period}"}}"#))
}

fn budget(e: &Exporter, channel: &str, period: &str) -> Option<f64> {
    e.metric(&format!(r#"kissbot_llm_budget_usd{{channel="{channel}",period="{period}"}}"#))
}

fn call(e: &Exporter, channel: &str, cost: f64) {
    e.send(&format!(
        r#"{{"type": "llm_usage", "channel": "{channel}", "model": "gpt-4", "feature": "chat", "tokens_in": 10, "tokens_out": 10, "cost_usd": {cost}}}"#
    ));
}

fn start(dir: &Path, budgets: &Path, extra: &[&str]) -> Exporter {
    let mut args = vec![format!("--budgets.file={}", budgets.display())];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Exporter::start_in(dir, &args)
}

/// Waits until the scrape shows `value` for a spend series.
fn wait_spend(e: &Exporter, channel: &str, period: &str, value: f64) {
    wait_until(&format!("spend of {channel} per {period} = {value}"), std::time::Duration::from_secs(15), || {
        close(spend(e, channel, period), value)
    });
}

#[test]
fn budgets_and_spend_survive_a_restart_and_show_in_the_api() {
    let now = unix_now();
    if Period::Day.next_start(now) - now < 120.0 {
        println!("SKIP: too close to UTC midnight for stable day sums");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("budgets.toml");
    std::fs::write(&file, BUDGETS).unwrap();
    let mut e = start(tmp.path(), &file, &[]);
    for bot in ["el_serda", "other"] {
        e.send(&format!(r#"{{"type": "register", "channel": "{bot}", "pid": 4242}}"#));
    }
    call(&e, "el_serda", 1.25);
    call(&e, "el_serda", 0.5);
    call(&e, "other", 0.25);
    // Neither a tracked bot nor an entry of its own: no series.
    call(&e, "stranger", 0.75);
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 4.0);
    wait_spend(&e, "el_serda", "day", 1.75);
    assert!(close(spend(&e, "el_serda", "month"), 1.75));
    assert!(close(budget(&e, "el_serda", "day"), 5.0));
    assert!(close(budget(&e, "el_serda", "month"), 100.0));
    assert!(close(spend(&e, "other", "day"), 0.25), "the * entry covers a tracked bot");
    assert!(close(budget(&e, "other", "day"), 1.0));
    assert!(close(budget(&e, "other", "month"), 20.0));
    assert_eq!(spend(&e, "stranger", "day"), None);
    assert_eq!(budget(&e, "stranger", "day"), None);

    let (status, headers, body) = e.get("/api/budgets");
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let bots = v["budgets"].as_array().unwrap();
    assert_eq!(bots.len(), 2, "{v}");
    let el = &bots[0];
    assert_eq!(el["channel"], "el_serda");
    assert_eq!(el["budget_from"], "el_serda");
    assert_eq!(el["day"]["budget_usd"], 5.0);
    assert!(close(el["day"]["spend_usd"].as_f64(), 1.75));
    assert!(close(el["day"]["remaining_usd"].as_f64(), 3.25));
    assert!(close(el["day"]["used_ratio"].as_f64(), 0.35));
    assert_eq!(el["day"]["since"], format_time(Period::Day.start(now)));
    assert!(close(el["month"]["remaining_usd"].as_f64(), 98.25));
    assert_eq!(el["month"]["since"], format_time(Period::Month.start(now)));
    assert_eq!(bots[1]["channel"], "other");
    assert_eq!(bots[1]["budget_from"], "*");
    assert!(close(bots[1]["day"]["remaining_usd"].as_f64(), 0.75));

    // A restart on the same database: the same spend, read back from it.
    assert!(e.terminate().success());
    let mut e = start(tmp.path(), &file, &[]);
    assert!(close(spend(&e, "el_serda", "day"), 1.75), "{}", e.scrape());
    assert!(close(spend(&e, "el_serda", "month"), 1.75));
    assert!(close(spend(&e, "other", "day"), 0.25), "a restored bot keeps its spend");
    assert!(e.terminate().success());

    // Rows the exporter did not write: a naive text time (UTC) without a
    // cost, priced from the table like /api/usage does (gpt-4: 30 and 60
    // USD per 1M tokens, so 1000 + 1000 tokens cost 0.09 USD); a Unix
    // number of milliseconds from last month, which counts for nothing.
    let naive = chrono_like_naive(now - 60.0);
    let last_month_ms = ((Period::Month.start(now) - 3600.0) * 1000.0) as i64;
    let db = rusqlite::Connection::open(tmp.path().join("monitor.db")).unwrap();
    db.execute(
        "INSERT INTO llm_usage(ts, channel, model, feature, tokens_in, tokens_out) VALUES (?1, 'el_serda', 'gpt-4', 'chat', 1000, 1000)",
        [&naive],
    )
    .unwrap();
    db.execute(
        "INSERT INTO llm_usage(ts, channel, model, feature, tokens_in, tokens_out, cost_usd) VALUES (?1, 'el_serda', 'gpt-4', 'chat', 1, 1, 50.0)",
        [last_month_ms],
    )
    .unwrap();
    drop(db);
    let e = start(tmp.path(), &file, &[]);
    assert!(close(spend(&e, "el_serda", "day"), 1.84), "{}", e.scrape());
    assert!(close(spend(&e, "el_serda", "month"), 1.84));
    // And live calls add to what was read back.
    call(&e, "el_serda", 0.16);
    wait_spend(&e, "el_serda", "day", 2.0);
}

/// `2026-12-01 12:00:00`: the naive UTC text the legacy monitor stored.
fn chrono_like_naive(t: f64) -> String {
    let iso = format_time(t);
    iso[..19].replace('T', " ")
}

#[test]
fn without_budgets_there_are_no_budget_series() {
    let e = Exporter::start(&[]);
    call(&e, "a", 1.0);
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 1.0);
    let text = e.scrape();
    assert!(!text.contains("kissbot_llm_budget_usd") && !text.contains("kissbot_llm_spend_usd"));
    let (status, _, body) = e.get("/api/budgets");
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8(body).unwrap(), r#"{"budgets":[]}"#);
}

#[test]
fn an_invalid_budgets_file_is_refused_at_start_by_check_config_and_on_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("budgets.toml");
    std::fs::write(&good, BUDGETS).unwrap();
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[[budget]]\nchannel = \"a\"\ndaily_usd = -5.0\n").unwrap();

    // At start: the exporter exits with the reason, before it binds anything.
    let out = Command::new(binary())
        .arg(format!("--budgets.file={}", bad.display()))
        .arg(format!("--socket.path={}", tmp.path().join("s.sock").display()))
        .arg(format!("--db.path={}", tmp.path().join("s.db").display()))
        .arg("--web.listen-address=127.0.0.1:0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("invalid budgets file") && stderr.contains("must be above 0"), "{stderr}");
    assert!(!tmp.path().join("s.db").exists(), "nothing was created");

    // --check-config.
    let (status, stderr, _) = run_binary(&["--check-config", &format!("--budgets.file={}", bad.display())]);
    assert!(!status.success());
    assert!(stderr.contains("invalid budgets file"), "{stderr}");
    let check = Command::new(binary())
        .args(["--check-config", &format!("--budgets.file={}", good.display())])
        .arg(format!("--socket.path={}", tmp.path().join("s.sock").display()))
        .arg(format!("--db.path={}", tmp.path().join("s.db").display()))
        .output()
        .unwrap();
    assert!(check.status.success());
    assert!(String::from_utf8_lossy(&check.stdout).contains("(2 budgets)"), "{check:?}");

    // On reload, by SIGHUP and by POST /-/reload: refused, the budgets in
    // force stay, and a good file later takes effect.
    let e = start(tmp.path(), &good, &["--web.enable-lifecycle"]);
    e.send(r#"{"type": "register", "channel": "el_serda", "pid": 4242}"#);
    assert!(close(budget(&e, "el_serda", "day"), 5.0));
    std::fs::write(&good, "[[budget]]\nchannel = \"el_serda\"\ndaily_usd = 5.0\nmonthly = 1\n").unwrap();
    e.signal(libc::SIGHUP);
    e.wait_metric(r#"kissbot_exporter_config_reloads_total{outcome="failure"}"#, 1.0);
    assert_eq!(e.metric("kissbot_exporter_config_last_reload_successful"), Some(0.0));
    assert!(e.log_text().contains("budgets reload refused"), "{}", e.log_text());
    let (status, _, body) = e.request("POST", "/-/reload", &[]);
    assert_eq!(status, 500);
    assert!(String::from_utf8_lossy(&body).contains("unknown field"));
    assert!(close(budget(&e, "el_serda", "day"), 5.0), "the previous budgets stay");
    assert!(close(budget(&e, "el_serda", "month"), 100.0));
    std::fs::write(&good, "[[budget]]\nchannel = \"el_serda\"\ndaily_usd = 7.5\n").unwrap();
    let (status, _, _) = e.request("POST", "/-/reload", &[]);
    assert_eq!(status, 200);
    assert!(close(budget(&e, "el_serda", "day"), 7.5));
    assert_eq!(budget(&e, "el_serda", "month"), None, "the monthly budget was removed");
    assert_eq!(e.metric("kissbot_exporter_config_last_reload_successful"), Some(1.0));
}
