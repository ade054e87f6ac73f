//! The landing page: the page an on-call person keeps open. Worst state
//! first (dead, stale, online, offline), fleet totals at the top, human
//! units, process figures and today's spend against the budget per bot, and
//! a filter by name.
//!
//! The server renders the whole page, so it works without JavaScript (a
//! `<noscript>` refresh reloads it, and the filter is a GET form). With
//! JavaScript, a small inline script fetches `/api/bots` every few seconds
//! and replaces the table rows and totals in place, without a reload. Nothing
//! is fetched from elsewhere: the CSS and the script are inline.

use std::fmt::Write as _;
use std::sync::Mutex;

use crate::clock::{format_time, unix_now};
use crate::state::{Bot, State, Status};

/// How often the script refreshes the table, in milliseconds.
const REFRESH_MS: u32 = 5000;

/// One bot as the page and `/api/bots` show it: the bot, plus what the
/// budgets know of it.
pub(super) struct BotView {
    /// The bot, copied under the lock.
    pub(crate) bot: Bot,
    /// USD spent today (UTC), when budgets track the bot.
    pub(crate) spend_today: Option<f64>,
    /// The bot's daily budget in USD, if it has one.
    pub(crate) budget_today: Option<f64>,
}

/// The bots as the page and `/api/bots` show them, and the fleet's spend.
pub(super) struct FleetView {
    /// The tracked bots, sorted by channel.
    pub(super) bots: Vec<BotView>,
    /// USD the fleet spent today (UTC), bots no longer tracked included, so
    /// that the total does not fall when a bot's series expire; `None`
    /// without `--budgets.file`.
    pub(super) spend_today: Option<f64>,
}

/// A snapshot of the bots, sorted by channel, taken under the lock.
pub(super) fn bot_views(state: &Mutex<State>) -> FleetView {
    let state = state.lock().unwrap_or_else(|e| e.into_inner());
    let mut bots: Vec<BotView> = state
        .bots()
        .map(|b| {
            let (spend_today, budget_today) = state.spend_today(&b.channel);
            BotView { bot: b.clone(), spend_today, budget_today }
        })
        .collect();
    let spend_today = state.spend_today_total();
    drop(state);
    bots.sort_by(|a, b| a.bot.channel.cmp(&b.bot.channel));
    FleetView { bots, spend_today }
}

/// Where a state sorts on the page: the ones that need someone first.
pub(super) fn rank(s: Status) -> u8 {
    match s {
        Status::Dead => 0,
        Status::Stale => 1,
        Status::Online => 2,
        Status::Offline => 3,
    }
}

/// Escapes text for HTML element content and quoted attribute values.
pub(crate) fn html_escape(s: &str) -> String {
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

/// A duration for people: `45s`, `2m 5s`, `3h 4m`, `2d 3h`. The script's
/// `dur` is its twin.
pub(super) fn human_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).floor() as u64;
    let (m, h) = (s / 60, s / 3600);
    if s < 60 {
        format!("{s}s")
    } else if m < 60 {
        format!("{m}m {}s", s % 60)
    } else if h < 24 {
        format!("{h}h {}m", m % 60)
    } else {
        format!("{}d {}h", h / 24, h % 24)
    }
}

/// Bytes in binary units: `512 B`, `3.4 MiB`, `34 MiB`. The script's
/// `bytes` is its twin.
pub(super) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 || v >= 10.0 {
        format!("{} {}", v.round(), UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

fn usd(v: f64) -> String {
    format!("${v:.2}")
}

/// Fleet totals over every bot (the filter does not change them).
struct Totals {
    by_status: [usize; 4],
    spend: Option<f64>,
    budget: Option<f64>,
    cpu_percent: f64,
    rss_bytes: u64,
}

fn totals(fleet: &FleetView) -> Totals {
    let mut t = Totals { by_status: [0; 4], spend: fleet.spend_today, budget: None, cpu_percent: 0.0, rss_bytes: 0 };
    for v in &fleet.bots {
        t.by_status[usize::from(rank(v.bot.status))] += 1;
        if let Some(b) = v.budget_today {
            *t.budget.get_or_insert(0.0) += b;
        }
        if let Some(p) = v.bot.process.filter(|p| p.alive) {
            t.cpu_percent += p.cpu_percent;
            t.rss_bytes += p.rss_bytes;
        }
    }
    t
}

/// The spend cell: `$1.75 / $5.00`, with a class when the budget is nearly
/// or wholly spent.
fn spend_cell(spend: Option<f64>, budget: Option<f64>) -> (String, &'static str) {
    match (spend, budget) {
        (Some(s), Some(b)) => {
            let class = if s >= b {
                "over"
            } else if s >= 0.8 * b {
                "near"
            } else {
                ""
            };
            (format!("{} / {}", usd(s), usd(b)), class)
        }
        (Some(s), None) => (usd(s), ""),
        _ => ("—".to_owned(), ""),
    }
}

/// The `q` parameter of the page's query string: the name filter.
pub(super) fn filter_of(query: &str) -> String {
    form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "q").map(|(_, v)| v.into_owned()).unwrap_or_default()
}

const STYLE: &str = "\
body{font-family:system-ui,sans-serif;margin:1.2em;color:#1f2328;background:#fff}\
h1{font-size:1.4em;margin:0 0 .4em}nav a{margin-right:.8em}\
.totals{display:flex;flex-wrap:wrap;gap:.6em;margin:.8em 0}\
.card{border:1px solid #d0d7de;border-radius:6px;padding:.4em .8em;min-width:4.5em}\
.card b{display:block;font-size:1.4em}\
table{border-collapse:collapse;width:100%}\
td,th{border-bottom:1px solid #d0d7de;padding:.3em .5em;text-align:left;white-space:nowrap}\
th{background:#f6f8fa}td.num{text-align:right}\
.badge{border-radius:1em;padding:0 .6em;color:#fff;font-weight:600}\
.badge.dead{background:#cf222e}.badge.stale{background:#bf8700}\
.badge.online{background:#1a7f37}.badge.offline{background:#6e7781}\
tr.dead{background:#ffebe9}tr.stale{background:#fff8c5}\
.card.dead b{color:#cf222e}.card.stale b{color:#9a6700}.card.online b{color:#1a7f37}.card.offline b{color:#57606a}\
.near{color:#9a6700;font-weight:600}.over{color:#cf222e;font-weight:700}\
#filter{font-size:1em;padding:.3em .5em;width:20em}\
.muted{color:#57606a;font-size:.9em}";

/// The script: fetches `/api/bots`, sorts worst first, and replaces the
/// rows and totals in place; filters rows by name as one types. Builds
/// every cell with `textContent`, so no bot name is ever parsed as HTML.
const SCRIPT: &str = r#"(function(){"use strict";
var RANK={dead:0,stale:1,online:2,offline:3};
function dur(s){s=Math.max(0,Math.floor(s));var m=Math.floor(s/60),h=Math.floor(s/3600);
if(s<60)return s+"s";if(m<60)return m+"m "+(s%60)+"s";if(h<24)return h+"h "+(m%60)+"m";return Math.floor(h/24)+"d "+(h%24)+"h";}
function bytes(b){var u=["B","KiB","MiB","GiB","TiB"],i=0;while(b>=1024&&i<u.length-1){b/=1024;i++;}
return(i===0||b>=10?String(Math.round(b)):b.toFixed(1))+" "+u[i];}
function usd(v){return "$"+v.toFixed(2);}
function cell(tr,text,cls){var td=document.createElement("td");td.textContent=text;if(cls)td.className=cls;tr.appendChild(td);return td;}
var filter=document.getElementById("filter"),tbody=document.getElementById("bots");
function applyFilter(){var q=filter.value.trim().toLowerCase(),shown=0;
Array.prototype.forEach.call(tbody.rows,function(r){var hide=q!==""&&r.dataset.channel.toLowerCase().indexOf(q)<0;r.hidden=hide;if(!hide)shown++;});
document.getElementById("empty").hidden=shown>0||tbody.rows.length===0;
document.getElementById("none").hidden=tbody.rows.length>0;}
function render(data){var bots=data.bots.slice();
bots.sort(function(a,b){return(RANK[a.status]-RANK[b.status])||(a.channel<b.channel?-1:a.channel>b.channel?1:0);});
var n={dead:0,stale:0,online:0,offline:0},spend=data.spend_today_usd_total,budget=null,cpu=0,mem=0;
var rows=bots.map(function(b){n[b.status]++;var p=b.process,alive=p&&p.alive;
if(b.budget_today_usd!==null)budget=(budget||0)+b.budget_today_usd;
if(alive){cpu+=p.cpu_percent;mem+=p.rss_bytes;}
var tr=document.createElement("tr");tr.className=b.status;tr.dataset.channel=b.channel;
cell(tr,b.channel,"name");var st=document.createElement("span");st.className="badge "+b.status;st.textContent=b.status;cell(tr,"").appendChild(st);
cell(tr,dur(b.status_age_seconds));cell(tr,dur(b.heartbeat_age_seconds)+" ago");cell(tr,String(b.pid),"num");
cell(tr,p?(p.alive?"alive":"gone"):"—");cell(tr,alive?p.cpu_percent.toFixed(1)+" %":"—","num");cell(tr,alive?bytes(p.rss_bytes):"—","num");
var s=b.spend_today_usd,bu=b.budget_today_usd,text="—",cls="num";
if(s!==null&&bu!==null){text=usd(s)+" / "+usd(bu);if(s>=bu)cls+=" over";else if(s>=0.8*bu)cls+=" near";}else if(s!==null){text=usd(s);}
cell(tr,text,cls);cell(tr,String(b.restarts),"num");
cell(tr,Object.keys(b.features).sort().map(function(f){return(b.features[f]?"":"-")+f;}).join(" "));return tr;});
tbody.replaceChildren.apply(tbody,rows);
["dead","stale","online","offline"].forEach(function(k){document.getElementById("n-"+k).textContent=n[k];});
document.getElementById("n-bots").textContent=bots.length;
document.getElementById("t-spend").textContent=spend===null?"—":usd(spend);
document.getElementById("t-budget").textContent=budget===null?"":"of "+usd(budget);
document.getElementById("t-cpu").textContent=cpu.toFixed(1)+" %";document.getElementById("t-mem").textContent=bytes(mem);
applyFilter();document.getElementById("updated").textContent="updated "+new Date().toLocaleTimeString();
document.documentElement.dataset.live="1";}
function update(){fetch("/api/bots",{cache:"no-store",credentials:"same-origin"}).then(function(r){if(!r.ok)throw new Error(r.status);return r.json();})
.then(render).catch(function(e){document.getElementById("updated").textContent="update failed ("+e.message+"); retrying";});}
filter.addEventListener("input",function(){applyFilter();var u=new URL(location.href);
if(filter.value)u.searchParams.set("q",filter.value);else u.searchParams.delete("q");history.replaceState(null,"",u);});
filter.form.addEventListener("submit",function(e){e.preventDefault();});
update();setInterval(update,REFRESH_MS);})();"#;

/// The page, as of now, with the bots whose name contains `filter` shown
/// and the others hidden (the script can show them again).
pub(super) fn landing_page(
    state: &Mutex<State>,
    socket_path: &std::path::Path,
    telemetry_path: &str,
    filter: &str,
) -> String {
    let now = unix_now();
    let mut fleet = bot_views(state);
    fleet
        .bots
        .sort_by(|a, b| rank(a.bot.status).cmp(&rank(b.bot.status)).then_with(|| a.bot.channel.cmp(&b.bot.channel)));
    let t = totals(&fleet);
    let bots = fleet.bots;
    let mut html = String::with_capacity(8192 + bots.len() * 512);
    let count = |s: Status| t.by_status[usize::from(rank(s))];
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>KissBot fleet</title><noscript><meta http-equiv=\"refresh\" content=\"30\"></noscript>\
         <style>{STYLE}</style></head><body>\n\
         <h1>KissBot fleet</h1>\n<nav><a href=\"{path}\">Metrics</a><a href=\"/health\">Health</a>\
         <a href=\"/api/bots\">Bots (JSON)</a><a href=\"/api/budgets\">Budgets (JSON)</a>\
         <a href=\"/api/usage?since=24h&amp;group_by=model\">LLM usage, 24 h (JSON)</a></nav>\n\
         <section class=\"totals\" id=\"totals\">\
         <div class=\"card\"><b id=\"n-bots\">{n}</b>bots</div>\
         <div class=\"card dead\"><b id=\"n-dead\">{dead}</b>dead</div>\
         <div class=\"card stale\"><b id=\"n-stale\">{stale}</b>stale</div>\
         <div class=\"card online\"><b id=\"n-online\">{online}</b>online</div>\
         <div class=\"card offline\"><b id=\"n-offline\">{offline}</b>offline</div>\
         <div class=\"card\"><b id=\"t-spend\">{spend}</b>spent today <span id=\"t-budget\">{budget}</span></div>\
         <div class=\"card\"><b id=\"t-cpu\">{cpu:.1} %</b>CPU</div>\
         <div class=\"card\"><b id=\"t-mem\">{mem}</b>memory</div></section>\n\
         <form method=\"get\" action=\"/\"><input id=\"filter\" name=\"q\" type=\"search\" \
         placeholder=\"Filter bots by name\" autocomplete=\"off\" value=\"{q}\"> \
         <span class=\"muted\" id=\"updated\">as of {at}</span></form>\n\
         <table><thead><tr><th>Bot</th><th>State</th><th>For</th><th>Last heartbeat</th><th>PID</th>\
         <th>Process</th><th>CPU</th><th>Memory</th><th title=\"UTC day\">Spend today / budget</th><th>Restarts</th>\
         <th>Features</th></tr></thead>\n<tbody id=\"bots\">\n",
        path = html_escape(telemetry_path),
        n = bots.len(),
        dead = count(Status::Dead),
        stale = count(Status::Stale),
        online = count(Status::Online),
        offline = count(Status::Offline),
        spend = t.spend.map_or_else(|| "—".to_owned(), usd),
        budget = t.budget.map(|b| format!("of {}", usd(b))).unwrap_or_default(),
        cpu = t.cpu_percent,
        mem = human_bytes(t.rss_bytes),
        q = html_escape(filter),
        at = html_escape(&format_time(now)),
    );
    let needle = filter.trim().to_lowercase();
    let mut shown = 0;
    for v in &bots {
        let b = &v.bot;
        let hidden = !needle.is_empty() && !b.channel.to_lowercase().contains(&needle);
        shown += usize::from(!hidden);
        let alive = b.process.filter(|p| p.alive);
        let process = match b.process {
            Some(p) if p.alive => "alive",
            Some(_) => "gone",
            None => "—",
        };
        let (spend, spend_class) = spend_cell(v.spend_today, v.budget_today);
        let features: Vec<String> =
            b.features.iter().map(|(f, on)| format!("{}{}", if *on { "" } else { "-" }, html_escape(f))).collect();
        let _ = writeln!(
            html,
            "<tr class=\"{s}\" data-channel=\"{ch}\"{hidden}><td class=\"name\">{ch}</td>\
             <td><span class=\"badge {s}\">{s}</span></td><td>{since}</td><td>{hb} ago</td><td class=\"num\">{pid}</td>\
             <td>{process}</td><td class=\"num\">{cpu}</td><td class=\"num\">{mem}</td>\
             <td class=\"num {spend_class}\">{spend}</td><td class=\"num\">{restarts}</td><td>{features}</td></tr>",
            s = b.status.as_str(),
            ch = html_escape(&b.channel),
            hidden = if hidden { " hidden" } else { "" },
            since = human_duration(now - b.status_since),
            hb = human_duration(now - b.last_heartbeat),
            pid = b.pid,
            cpu = alive.map_or_else(|| "—".to_owned(), |p| format!("{:.1} %", p.cpu_percent)),
            mem = alive.map_or_else(|| "—".to_owned(), |p| human_bytes(p.rss_bytes)),
            restarts = b.restarts,
            features = features.join(" "),
        );
    }
    let _ = write!(
        html,
        "</tbody></table>\n<p id=\"empty\"{empty_hidden}>No bot matches the filter.</p>\n\
         <div id=\"none\"{none_hidden}><p><strong>No bot has reported yet.</strong> Bots write to the socket \
         <code>{socket}</code> (the legacy monitor's default path needs no change in the bots). \
         To see one appear here now, send a heartbeat by hand:</p>\
         <pre>kissbot-exporter send heartbeat --socket.path {socket} --channel hello --pid $$</pre>\
         <p>Then point Prometheus at <a href=\"{path}\">{path}</a> and load the bundled alert rules and \
         Grafana dashboards (see the README).</p></div>\n\
         <p class=\"muted\">kissbot-exporter {version} · socket <code>{socket}</code> · \
         worst state first: dead, stale, online, offline.</p>\n\
         <script>{script}</script>\n</body></html>\n",
        empty_hidden = if shown > 0 || bots.is_empty() { " hidden" } else { "" },
        none_hidden = if bots.is_empty() { "" } else { " hidden" },
        path = html_escape(telemetry_path),
        version = env!("CARGO_PKG_VERSION"),
        socket = html_escape(&socket_path.display().to_string()),
        script = SCRIPT.replace("REFRESH_MS", &REFRESH_MS.to_string()),
    );
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_html() {
        assert_eq!(
            html_escape(r#"<script>alert("x'&")</script>"#),
            "&lt;script&gt;alert(&quot;x&#39;&amp;&quot;)&lt;/script&gt;"
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(human_duration(-3.0), "0s");
        assert_eq!(human_duration(45.9), "45s");
        assert_eq!(human_duration(125.0), "2m 5s");
        assert_eq!(human_duration(3.0 * 3600.0 + 4.0 * 60.0 + 59.0), "3h 4m");
        assert_eq!(human_duration(2.0 * 86_400.0 + 3.0 * 3600.0), "2d 3h");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 + 400 * 1024), "3.4 MiB");
        assert_eq!(human_bytes(34 * 1024 * 1024), "34 MiB");
        assert_eq!(human_bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
    }

    #[test]
    fn spend_against_budget() {
        assert_eq!(spend_cell(Some(1.75), Some(5.0)), ("$1.75 / $5.00".to_owned(), ""));
        assert_eq!(spend_cell(Some(4.0), Some(5.0)).1, "near");
        assert_eq!(spend_cell(Some(5.0), Some(5.0)).1, "over");
        assert_eq!(spend_cell(Some(0.5), None).0, "$0.50");
        assert_eq!(spend_cell(None, None).0, "—");
        assert_eq!(filter_of("q=el%20s&x=1"), "el s");
        assert_eq!(filter_of(""), "");
    }
}
