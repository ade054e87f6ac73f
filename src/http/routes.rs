//! What each path answers: `/metrics`, `/`, `/health*`, `/api/bots`,
//! `POST /api/bots/{channel}/forget`, `/api/usage`, `/api/budgets` and
//! `/-/reload`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, ACCEPT_ENCODING, ALLOW, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER, VARY};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tracing::warn;

use super::landing::{bot_views, filter_of, landing_page};
use super::App;
use crate::budget::{BudgetLine, Period, WILDCARD};
use crate::clock::{format_time, parse_time, unix_now};
use crate::metrics::Format;
use crate::state::{Forget, State};
use crate::store::usage::{self, UsageError, UsageGroup, UsageQuery};

/// The writer is considered stuck when its loop has not turned this long.
const WRITER_STUCK_AFTER: f64 = 30.0;

/// The queue is reported degraded above this fill ratio.
const QUEUE_DEGRADED_RATIO: f64 = 0.9;

fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    response(status, "application/json", value.to_string())
}

pub(super) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", body)
}

pub(super) async fn dispatch(app: &App, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path == "/-/reload" {
        return reload(app, &req).await;
    }
    if let Some(channel) = path.strip_prefix("/api/bots/").and_then(|p| p.strip_suffix("/forget")) {
        return forget(app, &req, channel);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if path == app.telemetry_path {
        return metrics(app, &req).await;
    }
    match path {
        "/" => {
            let state = app.state.clone();
            let (socket, path) = (app.socket_path.clone(), app.telemetry_path.clone());
            let filter = filter_of(req.uri().query().unwrap_or(""));
            large_page(app, "landing page", "text/html; charset=utf-8", move || {
                landing_page(&state, &socket, &path, &filter)
            })
            .await
        }
        "/health" => health(app),
        "/healthz" | "/health/live" => text(StatusCode::OK, "ok\n"),
        // As Prometheus and its exporters answer them.
        "/-/healthy" => text(StatusCode::OK, "kissbot-exporter is Healthy.\n"),
        "/-/ready" if ready(app) => text(StatusCode::OK, "kissbot-exporter is Ready.\n"),
        "/-/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable\n"),
        "/health/ready" if ready(app) => text(StatusCode::OK, "ready\n"),
        "/health/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/api/bots" => {
            let state = app.state.clone();
            large_page(app, "bots list", "application/json", move || bots_json(&state).to_string()).await
        }
        "/api/usage" => usage(app, req.uri().query().unwrap_or("")).await,
        "/api/budgets" => {
            // Up to one line per bot plus the file's entries.
            let state = app.state.clone();
            large_page(app, "budgets", "application/json", move || {
                let lines = state.lock().unwrap_or_else(|e| e.into_inner()).budget_lines();
                budgets_json(&lines, unix_now()).to_string()
            })
            .await
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The items of a header such as `Accept` or `Accept-Encoding`, lower-cased,
/// each with its q-value (1 when it has none).
fn weighted(header: &str) -> impl Iterator<Item = (String, f64)> + '_ {
    header.split(',').map(|item| {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| {
                let (k, v) = p.split_once('=')?;
                k.trim().eq_ignore_ascii_case("q").then(|| v.trim().parse::<f64>().ok()).flatten()
            })
            .next()
            .unwrap_or(1.0);
        (name, q)
    })
}

/// Ready: the socket accepts connections and the database writer runs.
fn ready(app: &App) -> bool {
    app.socket_listening.load(Ordering::SeqCst) && app.writer.running.load(Ordering::SeqCst)
}

/// A page that walks every bot (the landing page, the bots list, the
/// budgets): built off the runtime's workers, like /metrics, and counted in
/// the memory budget of large responses — 503 while that budget is spent.
async fn large_page(
    app: &App,
    what: &str,
    content_type: &'static str,
    build: impl FnOnce() -> String + Send + 'static,
) -> Response<Full<Bytes>> {
    if app.scrapes.over_budget(0) {
        return busy(what);
    }
    match tokio::task::spawn_blocking(build).await {
        Ok(body) => response(StatusCode::OK, content_type, app.scrapes.account(body.into_bytes())),
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "failed\n"),
    }
}

/// Whether an `Accept-Encoding` value accepts gzip, honouring q-values:
/// `gzip;q=0` refuses it, and `*` stands for it when gzip is not named.
pub(crate) fn accepts_gzip(header: &str) -> bool {
    let mut star = None;
    for (coding, q) in weighted(header) {
        match coding.as_str() {
            "gzip" | "x-gzip" => return q > 0.0,
            "*" => star = Some(q > 0.0),
            _ => {}
        }
    }
    star.unwrap_or(false)
}

/// The format a scraper's `Accept` header asks for, honouring q-values:
/// OpenMetrics when `application/openmetrics-text` is acceptable at least
/// as much as the text format (`text/plain`, `text/*` or `*/*`), the text
/// format otherwise — and always without the header.
fn negotiate(accept: Option<&str>) -> Format {
    let Some(accept) = accept else { return Format::Text };
    let (mut open_metrics, mut text) = (0.0f64, 0.0f64);
    for (media, q) in weighted(accept) {
        match media.as_str() {
            "application/openmetrics-text" => open_metrics = open_metrics.max(q),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    if open_metrics > 0.0 && open_metrics >= text {
        Format::OpenMetrics
    } else {
        Format::Text
    }
}

async fn metrics(app: &App, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let arrived = Instant::now();
    let gzip = req.headers().get(ACCEPT_ENCODING).and_then(|v| v.to_str().ok()).is_some_and(accepts_gzip);
    let format = negotiate(req.headers().get(ACCEPT).and_then(|v| v.to_str().ok()));
    match app.scrapes.get(&app.metrics, &app.state, arrived, gzip, format).await {
        Ok(body) => {
            let mut r = response(StatusCode::OK, format.content_type(), body);
            r.headers_mut().insert(VARY, HeaderValue::from_static("Accept, Accept-Encoding"));
            if gzip {
                r.headers_mut().insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            }
            r
        }
        Err(e) => {
            warn!(error = %e, "rendering metrics failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, "rendering metrics failed\n")
        }
    }
}

/// 503 for a page that would take the response memory over its budget.
fn busy(what: &str) -> Response<Full<Bytes>> {
    let mut r =
        text(StatusCode::SERVICE_UNAVAILABLE, format!("{what}: too many large responses in flight; retry shortly\n"));
    r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("5"));
    r
}

/// The answer to a lifecycle request (`/-/reload`, forgetting a bot) that
/// must not run: not a POST, or the lifecycle API is off.
fn lifecycle_guard(app: &App, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    if req.method() != Method::POST {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("POST"));
        return Some(r);
    }
    if !app.enable_lifecycle {
        return Some(text(StatusCode::FORBIDDEN, "lifecycle API is not enabled (start with --web.enable-lifecycle)\n"));
    }
    None
}

async fn reload(app: &App, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(refused) = lifecycle_guard(app, req) {
        return refused;
    }
    // In turn with every other reload, so that a 200 is never undone by a
    // reload that read the files earlier.
    match app.reloader.reload().await {
        Ok(()) => text(StatusCode::OK, "reloaded\n"),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// `POST /api/bots/{channel}/forget` (the channel percent-encoded): an
/// operator says a dead or stale bot is gone for good, so its series and
/// alerts end (see `State::forget`). Guarded like `/-/reload`: POST only,
/// only with `--web.enable-lifecycle`, and behind the web configuration's
/// authentication like every endpoint.
fn forget(app: &App, req: &Request<Incoming>, encoded: &str) -> Response<Full<Bytes>> {
    if let Some(refused) = lifecycle_guard(app, req) {
        return refused;
    }
    let Some(channel) = percent_decode(encoded).filter(|c| !c.is_empty()) else {
        return bad_request("the channel must be non-empty, percent-encoded UTF-8");
    };
    let outcome = app.state.lock().unwrap_or_else(|e| e.into_inner()).forget(&channel, unix_now());
    match outcome {
        Forget::Forgotten(was) => {
            json_response(StatusCode::OK, &json!({ "channel": channel, "forgotten": true, "was": was.as_str() }))
        }
        Forget::Unknown => {
            json_response(StatusCode::NOT_FOUND, &json!({ "error": format!("no bot {channel:?} is tracked") }))
        }
        Forget::Online => json_response(
            StatusCode::CONFLICT,
            &json!({ "error": format!("bot {channel:?} is online; its next heartbeat would bring it back, so stop it or let it unregister") }),
        ),
    }
}

/// Decodes `%XX` escapes of a path segment (a `+` stays a `+`, unlike in a
/// query string); `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
            // Two hex digits always make a byte.
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Sets a flag when dropped: hyper drops a request's future when its client
/// goes away, and the query thread sees the flag and stops.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// `/api/usage?since=24h&group_by=model`: sums from SQLite. `since` is a
/// duration back from now or a time in any form the database holds. At most
/// `--web.max-usage-queries` run at once (503 with `Retry-After` beyond),
/// each on a thread of its own, stopped when its client goes away, after
/// `--web.usage-query-timeout`, or at shutdown.
async fn usage(app: &App, query: &str) -> Response<Full<Bytes>> {
    let mut since = None;
    let mut group_by = usage::GroupBy::Model;
    for (k, v) in form_pairs(query) {
        match k.as_str() {
            "since" => match crate::config::parse_duration(&v) {
                Ok(d) => since = Some(unix_now() - d.as_secs_f64()),
                // A `+` of an offset written unescaped arrives as a space.
                Err(_) => match parse_time(&v).or_else(|| parse_time(&v.replacen(' ', "+", 1))) {
                    Some(t) => since = Some(t),
                    None => {
                        return bad_request(&format!("since={v:?} is neither a duration (24h) nor an ISO-8601 time"))
                    }
                },
            },
            "group_by" => match usage::GroupBy::parse(&v) {
                Some(g) => group_by = g,
                None => return bad_request("group_by must be channel, model or feature"),
            },
            _ => return bad_request(&format!("unknown parameter {k:?}")),
        }
    }
    let Ok(permit) = app.usage.permits.clone().try_acquire_owned() else {
        let mut r = json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "too many usage queries running (--web.max-usage-queries); retry shortly"}),
        );
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("5"));
        return r;
    };
    let pricing = app.state.lock().unwrap_or_else(|e| e.into_inner()).pricing().clone();
    let q = UsageQuery { path: app.db_path.clone(), since, group_by, pricing, timeout: app.usage.timeout };
    let cancel = Arc::new(AtomicBool::new(false));
    let _cancel_on_drop = CancelOnDrop(cancel.clone());
    let stopping = app.usage.stopping.clone();
    let spawned = crate::own_thread::spawn("kissbot-usage", move || {
        let result = usage::usage_totals(&q, cancel, stopping);
        drop(permit);
        result
    });
    let query = match spawned {
        Ok(query) => query,
        Err(e) => {
            warn!(error = %e, "cannot start a usage query thread");
            return json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"error": "cannot start the query"}));
        }
    };
    match query.await {
        Some(Ok(groups)) => {
            let mut total = UsageGroup::default();
            for g in &groups {
                total.add(g);
            }
            json_response(
                StatusCode::OK,
                &json!({
                    "since": since.map(format_time),
                    "group_by": group_by.column(),
                    "groups": groups,
                    "total": total,
                }),
            )
        }
        Some(Err(UsageError::Stopped(usage::Stopped::Timeout))) => {
            warn!(timeout = ?app.usage.timeout, "usage query stopped at its time limit");
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"error": format!("query took longer than --web.usage-query-timeout ({:?}); narrow it with since=", app.usage.timeout)}),
            )
        }
        Some(Err(UsageError::Stopped(usage::Stopped::Cancelled))) => {
            json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"error": "query cancelled"}))
        }
        Some(Err(UsageError::Failed(e))) => {
            warn!(error = %e, "usage query failed");
            json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"error": e.to_string()}))
        }
        None => json_response(StatusCode::INTERNAL_SERVER_ERROR, &json!({"error": "usage query failed"})),
    }
}

/// The decoded `key=value` pairs of a query string.
fn form_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

fn bad_request(msg: &str) -> Response<Full<Bytes>> {
    json_response(StatusCode::BAD_REQUEST, &json!({ "error": msg }))
}

fn health(app: &App) -> Response<Full<Bytes>> {
    let socket_ok = app.socket_listening.load(Ordering::SeqCst);
    let db_ok = app.metrics.db_up.get() == 1;
    let depth = app.metrics.queue_depth.get();
    let capacity = app.metrics.queue_capacity.get().max(1);
    let queue_ok = (depth as f64) < QUEUE_DEGRADED_RATIO * capacity as f64;
    let writer_age = unix_now() - app.writer.last_loop.load(Ordering::Relaxed) as f64;
    let writer_ok = app.writer.running.load(Ordering::SeqCst) && writer_age < WRITER_STUCK_AFTER;
    let word = |ok: bool| if ok { "healthy" } else { "degraded" };
    let all = socket_ok && db_ok && queue_ok && writer_ok;
    let body = json!({
        "status": word(all),
        "version": env!("CARGO_PKG_VERSION"),
        "components": {
            "socket": {"status": word(socket_ok), "path": app.socket_path.display().to_string()},
            "database": {"status": word(db_ok), "path": app.db_path.display().to_string(),
                         "write_errors": app.metrics.db_write_errors.get()},
            "queue": {"status": word(queue_ok), "depth": depth, "capacity": capacity},
            "writer": {"status": word(writer_ok), "last_loop_age_seconds": writer_age.max(0.0).round()},
        }
    });
    json_response(if all { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, &body)
}

/// `/api/budgets`: per bot with a budget, the budget, spend and remaining
/// USD of each period the budget sets, and when that period began.
fn budgets_json(lines: &[BudgetLine], now: f64) -> serde_json::Value {
    let bots: Vec<_> = lines
        .iter()
        .map(|l| {
            let mut bot = serde_json::Map::new();
            bot.insert("channel".into(), json!(l.channel));
            bot.insert("budget_from".into(), json!(if l.explicit { l.channel.as_str() } else { WILDCARD }));
            for period in Period::ALL {
                let value = match l.budget.of(period) {
                    Some(budget) => {
                        let spend = l.spend.of(period);
                        json!({
                            "since": format_time(period.start(now)),
                            "budget_usd": budget,
                            "spend_usd": spend,
                            "remaining_usd": (budget - spend).max(0.0),
                            "used_ratio": spend / budget,
                        })
                    }
                    None => serde_json::Value::Null,
                };
                bot.insert(period.as_str().into(), value);
            }
            serde_json::Value::Object(bot)
        })
        .collect();
    json!({ "budgets": bots })
}

fn bots_json(state: &Mutex<State>) -> serde_json::Value {
    let now = unix_now();
    let fleet = bot_views(state);
    let bots: Vec<_> = fleet
        .bots
        .into_iter()
        .map(|v| {
            let b = &v.bot;
            let features: serde_json::Map<_, _> = b.features.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            // Absent until the sampler has looked at the process; never for
            // a pid the exporter cannot see (another pid namespace).
            let process = b.process.map(|p| {
                json!({
                    "alive": p.alive,
                    "cpu_seconds": State::cpu_seconds_total(b),
                    "cpu_percent": p.cpu_percent,
                    "rss_bytes": p.rss_bytes,
                })
            });
            json!({
                "channel": b.channel,
                "pid": b.pid,
                "status": b.status.as_str(),
                "status_since": format_time(b.status_since),
                "status_age_seconds": (now - b.status_since).max(0.0),
                "features": features,
                "registered_at": format_time(b.registered_at),
                "last_heartbeat": format_time(b.last_heartbeat),
                "heartbeat_age_seconds": (now - b.last_heartbeat).max(0.0),
                "heartbeats": b.heartbeats,
                "restarts": b.restarts,
                "process": process,
                "spend_today_usd": v.spend_today,
                "budget_today_usd": v.budget_today,
            })
        })
        .collect();
    json!({ "bots": bots, "spend_today_usd_total": fleet.spend_today })
}

#[cfg(test)]
mod tests {
    use super::{accepts_gzip, negotiate, percent_decode};
    use crate::metrics::Format;

    #[test]
    fn negotiates_openmetrics_by_q_value() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(negotiate(Some("application/openmetrics-text")), Format::OpenMetrics);
        assert_eq!(negotiate(Some("text/plain, Application/OpenMetrics-Text")), Format::OpenMetrics);
        assert_eq!(negotiate(Some("text/plain;q=0.5,application/openmetrics-text;q=0.5")), Format::OpenMetrics);
        assert_eq!(negotiate(Some("application/openmetrics-text;q=0.5,text/plain")), Format::Text);
        assert_eq!(negotiate(Some("application/openmetrics-text;q=0, */*")), Format::Text);
        assert_eq!(negotiate(Some("*/*")), Format::Text);
        assert_eq!(negotiate(Some("")), Format::Text);
        assert_eq!(negotiate(None), Format::Text);
    }

    #[test]
    fn decodes_path_segments() {
        assert_eq!(percent_decode("el_serda").as_deref(), Some("el_serda"));
        assert_eq!(percent_decode("a%2Fb%20c+d").as_deref(), Some("a/b c+d"));
        assert_eq!(percent_decode("%C3%A9t%C3%A9").as_deref(), Some("été"));
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%+1"), None, "a sign is not a digit");
        assert_eq!(percent_decode("%FF"), None, "not UTF-8");
    }

    #[test]
    fn gzip_q_values() {
        assert!(accepts_gzip("gzip"));
        assert!(accepts_gzip("deflate, gzip;q=0.5"));
        assert!(accepts_gzip("GZIP"));
        assert!(accepts_gzip("*"));
        assert!(!accepts_gzip("gzip;q=0"));
        assert!(!accepts_gzip("gzip;q=0, identity"));
        assert!(!accepts_gzip("gzip; q=0.0, *"));
        assert!(!accepts_gzip("identity"));
        assert!(!accepts_gzip("*;q=0"));
        assert!(!accepts_gzip(""));
    }
}
