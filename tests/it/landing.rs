//! The landing page in a real browser: headless Chromium renders it with
//! bots in every state (online, stale, offline and dead, the last one a real
//! process that exited), runs its script, and the DOM must show the worst
//! state first, human units, process figures and spend against budget. The
//! page must be whole without the script too. Prints `SKIP:` without
//! Chromium, and fails instead under `CI`.
//!
//! `KISSBOT_UPDATE_SCREENSHOT=1` also copies the screenshot the test takes
//! to docs/landing.png, the picture in the README.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bundle_support::{strict, which};
use crate::common::*;

fn chromium() -> Option<PathBuf> {
    if let Some(c) = which("chromium").or_else(|| which("chromium-browser")) {
        return Some(c);
    }
    let msg = "chromium not installed (apt-get install chromium)";
    if strict() {
        panic!("{msg}; CI is set, so a missing tool fails the test");
    }
    eprintln!("SKIP: landing: {msg}");
    None
}

/// Runs headless Chromium with `args` and a fresh profile; returns stdout.
fn run_chromium(chromium: &Path, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 60 s: {args:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().unwrap()
}

/// The DOM after the page's scripts ran (virtual time lets its first fetch
/// of /api/bots finish before the dump).
fn dom(chromium: &Path, url: &str) -> String {
    run_chromium(chromium, &["--virtual-time-budget=4000", "--dump-dom", url])
}

/// A real bot process that registers itself, then exits without unregistering.
fn short_lived_bot(socket: &Path, channel: &str) -> Child {
    python_bot_then(socket, channel, "time.sleep(1.5)\n")
}

/// The `data-channel` of every row of the bots table, in order, and
/// whether each is hidden.
fn rows(html: &str) -> Vec<(String, bool)> {
    let body = html.split("<tbody id=\"bots\">").nth(1).unwrap_or_else(|| panic!("no bots table:\n{html}"));
    let body = body.split("</tbody>").next().unwrap();
    body.split("<tr ")
        .skip(1)
        .map(|tr| {
            let head = tr.split('>').next().unwrap();
            let channel = head.split("data-channel=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
            (channel, head.contains("hidden"))
        })
        .collect()
}

/// The row of one bot, as HTML.
fn row<'a>(html: &'a str, channel: &str) -> &'a str {
    let start = html.find(&format!("data-channel=\"{channel}\"")).unwrap_or_else(|| panic!("no row {channel}"));
    let rest = &html[start..];
    &rest[..rest.find("</tr>").unwrap()]
}

fn check_page(html: &str, what: &str) {
    let order: Vec<String> = rows(html).into_iter().map(|(c, _)| c).collect();
    assert_eq!(order, ["py_dead", "quiet_bot", "el_serda", "gone_bot"], "{what}: worst state first");
    let online = row(html, "el_serda");
    assert!(online.contains("badge online") && online.contains(">alive<"), "{what}: {online}");
    assert!(online.contains(" MiB<") || online.contains(" KiB<") || online.contains(" GiB<"), "{what}: {online}");
    assert!(online.contains(" %<"), "{what}: CPU: {online}");
    assert!(online.contains("num near\">$4.20 / $5.00<"), "{what}: spend against budget: {online}");
    let dead = row(html, "py_dead");
    assert!(dead.contains("badge dead") && dead.contains(">gone<"), "{what}: {dead}");
    assert!(dead.contains(">$0.00 / $1.00<"), "{what}: the * budget: {dead}");
    let stale = row(html, "quiet_bot");
    assert!(stale.contains("badge stale") && stale.contains("s ago<"), "{what}: {stale}");
    assert!(row(html, "gone_bot").contains("badge offline"), "{what}");
    for (id, n) in [("n-bots", 4), ("n-dead", 1), ("n-stale", 1), ("n-online", 1), ("n-offline", 1)] {
        assert!(html.contains(&format!("id=\"{id}\">{n}<")), "{what}: total {id} = {n}");
    }
    assert!(html.contains("id=\"t-spend\">$4.20<"), "{what}: spend today");
    assert!(html.contains("id=\"t-budget\">of $8.00<"), "{what}: fleet budget of four bots");
    assert!(html.contains("id=\"filter\""), "{what}: the filter box");
}

#[test]
fn the_landing_page_shows_the_worst_first_and_updates_itself() {
    let Some(chromium) = chromium() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let budgets = tmp.path().join("budgets.toml");
    std::fs::write(
        &budgets,
        "[[budget]]\nchannel = \"el_serda\"\ndaily_usd = 5.0\n[[budget]]\nchannel = \"*\"\ndaily_usd = 1.0\n",
    )
    .unwrap();
    let e = Exporter::start_in(
        tmp.path(),
        &[&format!("--budgets.file={}", budgets.display()), "--heartbeat.stale-after=1s", "--sampler.interval=200ms"],
    );

    // Dead: a real process that registered and exited.
    let mut py = short_lived_bot(&e.socket, "py_dead");
    e.wait_metric(r#"kissbot_bot_process_alive{channel="py_dead"}"#, 1.0);
    // Online: this test process heartbeats on its own behalf, so it is
    // sampled (CPU, memory) and never goes stale.
    let stop = Arc::new(AtomicBool::new(false));
    let heartbeats = {
        let (stop, socket) = (stop.clone(), e.socket.clone());
        let line = format!(r#"{{"type": "heartbeat", "channel": "el_serda", "pid": {}}}"#, std::process::id());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&socket) {
                    use std::io::Write;
                    let _ = writeln!(s, "{line}");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    e.send(r#"{"type": "llm_usage", "channel": "el_serda", "model": "gpt-4", "feature": "chat", "tokens_in": 10, "tokens_out": 10, "cost_usd": 4.2}"#);
    // Stale: registered once, then silent.
    e.send(r#"{"type": "register", "channel": "quiet_bot", "pid": 4000001, "features": {"llm": true, "tts": false}}"#);
    // Offline: unregistered.
    e.send(r#"{"type": "register", "channel": "gone_bot", "pid": 4000002}"#);
    e.wait_metric(r#"kissbot_bot_up{channel="gone_bot"}"#, 1.0);
    e.send(r#"{"type": "unregister", "channel": "gone_bot", "pid": 4000002}"#);
    py.wait().unwrap();
    for (channel, status) in
        [("py_dead", "dead"), ("quiet_bot", "stale"), ("el_serda", "online"), ("gone_bot", "offline")]
    {
        e.wait_metric(&format!(r#"kissbot_bot_status{{channel="{channel}",status="{status}"}}"#), 1.0);
    }
    e.wait_metric(r#"kissbot_bot_process_alive{channel="el_serda"}"#, 1.0);

    // Without JavaScript: the server's page is whole.
    let (status, headers, body) = e.get("/");
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let plain = String::from_utf8(body).unwrap();
    check_page(&plain, "server-rendered");
    assert!(!plain.contains("data-live"), "the script has not run");
    assert!(!plain.contains("src=\"http") && !plain.contains("href=\"http"), "nothing fetched from elsewhere");
    assert!(plain.contains("<noscript><meta http-equiv=\"refresh\""), "refreshes without JavaScript too");

    // The JSON the script reads.
    let (_, _, body) = e.get("/api/bots");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let el = v["bots"].as_array().unwrap().iter().find(|b| b["channel"] == "el_serda").unwrap().clone();
    assert_eq!(el["process"]["alive"], true, "{el}");
    assert!(el["process"]["rss_bytes"].as_u64().unwrap() > 0);
    assert_eq!(el["spend_today_usd"], 4.2);
    assert_eq!(el["budget_today_usd"], 5.0);

    // In a browser, after the script replaced the rows from /api/bots.
    let url = format!("http://{}/", e.addr);
    let live = dom(&chromium, &url);
    assert!(live.contains("data-live=\"1\""), "the script ran and rendered /api/bots:\n{live}");
    check_page(&live, "after the script");
    assert!(live.contains("id=\"updated\">updated "), "{live}");

    // The filter: on the server for the first load, then in the browser.
    let (_, _, body) = e.get("/?q=QUIET");
    let filtered = String::from_utf8(body).unwrap();
    let hidden: Vec<_> = rows(&filtered).into_iter().filter(|(_, h)| !*h).map(|(c, _)| c).collect();
    assert_eq!(hidden, ["quiet_bot"], "only the match is shown");
    let live = dom(&chromium, &format!("{url}?q=quiet"));
    assert!(live.contains("data-live=\"1\""));
    let shown: Vec<_> = rows(&live).into_iter().filter(|(_, h)| !*h).map(|(c, _)| c).collect();
    assert_eq!(shown, ["quiet_bot"], "the script keeps the filter:\n{live}");

    // A screenshot, for people.
    let shot = tmp.path().join("landing.png");
    run_chromium(
        &chromium,
        &["--virtual-time-budget=4000", &format!("--screenshot={}", shot.display()), "--window-size=1200,800", &url],
    );
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real picture: {} bytes", png.len());
    if std::env::var_os("KISSBOT_UPDATE_SCREENSHOT").is_some() {
        std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/landing.png"), &png).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    heartbeats.join().unwrap();
}

/// A fresh install shows what to do next instead of an empty table; the
/// advice goes once a bot has reported.
#[test]
fn with_no_bots_the_page_says_what_to_do_next() {
    let e = Exporter::start(&[]);
    let (status, _, body) = e.get("/");
    let body = String::from_utf8(body).unwrap();
    assert_eq!(status, 200);
    let none = body.split("<div id=\"none\"").nth(1).expect("the no-bots advice").split("</div>").next().unwrap();
    assert!(!none.starts_with(" hidden"), "{none}");
    assert!(none.contains("No bot has reported yet"), "{none}");
    assert!(none.contains(&format!("send heartbeat --socket.path {}", e.socket.display())), "{none}");
    assert!(none.contains("href=\"/metrics\""), "{none}");
    e.send(HEARTBEAT);
    e.wait_metric(r#"kissbot_bot_up{channel="el_serda"}"#, 1.0);
    let (_, _, body) = e.get("/");
    let body = String::from_utf8(body).unwrap();
    assert!(body.contains("<div id=\"none\" hidden>"), "the advice stays once a bot reported");
}
