//! The HTML landing page: version, links, and a table of the bots.

use std::fmt::Write as _;
use std::sync::Mutex;

use crate::clock::{format_time, unix_now};
use crate::state::{State, Status};

/// A snapshot of the bots, sorted by channel, taken under the lock.
pub(super) fn bot_rows(state: &Mutex<State>) -> Vec<crate::state::Bot> {
    let mut bots: Vec<_> = state.lock().unwrap_or_else(|e| e.into_inner()).bots().cloned().collect();
    bots.sort_by(|a, b| a.channel.cmp(&b.channel));
    bots
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub(super) fn landing_page(state: &Mutex<State>, socket_path: &std::path::Path, telemetry_path: &str) -> String {
    let now = unix_now();
    let bots = bot_rows(state);
    let count = |s: Status| bots.iter().filter(|b| b.status == s).count();
    let mut html = String::with_capacity(4096 + bots.len() * 256);
    let path = html_escape(telemetry_path);
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>KissBot Exporter</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}.online{{color:#1a7f37}}\
         .stale{{color:#9a6700}}.dead{{color:#cf222e}}.offline{{color:#57606a}}</style></head><body>\n\
         <h1>KissBot Exporter</h1>\n<p>Version {version}. <a href=\"{path}\">Metrics</a> · \
         <a href=\"/health\">Health</a> · <a href=\"/api/bots\">Bots (JSON)</a> · \
         <a href=\"/api/usage?since=24h&amp;group_by=model\">LLM usage, last 24 h (JSON)</a></p>\n\
         <p>Socket <code>{socket}</code>. {n} bots: {on} online, {st} stale, {off} offline, {dead} dead.</p>\n\
         <table><tr><th>Channel</th><th>State</th><th>PID</th><th>Heartbeat age</th><th>Registered</th>\
         <th>Restarts</th><th>Features</th></tr>\n",
        version = env!("CARGO_PKG_VERSION"),
        socket = html_escape(&socket_path.display().to_string()),
        n = bots.len(),
        on = count(Status::Online),
        st = count(Status::Stale),
        off = count(Status::Offline),
        dead = count(Status::Dead),
    );
    for b in &bots {
        let features: Vec<String> =
            b.features.iter().map(|(f, on)| format!("{}{}", if *on { "" } else { "-" }, html_escape(f))).collect();
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td class=\"{s}\">{s}</td><td>{}</td><td>{:.0}s</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            html_escape(&b.channel),
            b.pid,
            (now - b.last_heartbeat).max(0.0),
            html_escape(&format_time(b.registered_at)),
            b.restarts,
            features.join(" "),
            s = b.status.as_str(),
        );
    }
    html.push_str("</table>\n</body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::html_escape;

    #[test]
    fn escapes_html() {
        assert_eq!(
            html_escape(r#"<script>alert("x'&")</script>"#),
            "&lt;script&gt;alert(&quot;x&#39;&amp;&quot;)&lt;/script&gt;"
        );
    }
}
