//! Log output: the level filter and the three formats of `--log.format`.
//!
//! `logfmt` is written here rather than by a general-purpose crate because
//! it must match what Prometheus itself writes (promslog): the keys `time`,
//! `level`, `source` and `msg`, in that order, upper-case levels, then the
//! event's own fields. Operators run one log pipeline for Prometheus,
//! Alertmanager and this exporter, and a parser written for one should read
//! the others.

use std::fmt::{self, Write as _};
use std::io::Write as _;

use chrono::TimeZone;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{Config, LogFormat};
use crate::error::{Error, Result};

/// Installs the global subscriber for `config`'s level and format. Logs go
/// to standard error.
pub fn init(config: &Config) -> Result<()> {
    let filter = || {
        EnvFilter::try_new(config.log_level.as_str())
            .map_err(|e| Error::Config { what: "--log.level", reason: e.to_string() })
    };
    let installed = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter()?)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .try_init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .with_env_filter(filter()?)
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .try_init(),
        LogFormat::Logfmt => tracing_subscriber::registry().with(filter()?).with(Logfmt).try_init().map_err(Into::into),
    };
    installed.map_err(|e| Error::Config { what: "--log.format", reason: format!("cannot install the logger: {e}") })
}

/// A layer that writes each event as one promslog-style logfmt line.
struct Logfmt;

impl<S: Subscriber> Layer<S> for Logfmt {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let line = format_event(event, crate::clock::unix_now());
        // A log line that cannot be written (standard error closed) is lost;
        // there is nowhere left to report that.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

/// The logfmt line for `event` at `now` (Unix seconds), newline included.
fn format_event(event: &Event<'_>, now: f64) -> String {
    let meta = event.metadata();
    let mut line = String::with_capacity(160);
    line.push_str("time=");
    line.push_str(&rfc3339_millis(now));
    line.push_str(" level=");
    line.push_str(level_name(*meta.level()));
    if let (Some(file), Some(n)) = (meta.file(), meta.line()) {
        let file = file.rsplit('/').next().unwrap_or(file);
        let _ = write!(line, " source={file}:{n}");
    }
    let mut fields = Fields { msg: String::new(), rest: String::new() };
    event.record(&mut fields);
    line.push_str(" msg=");
    push_value(&mut line, &fields.msg);
    line.push_str(&fields.rest);
    line.push('\n');
    line
}

/// `now` (Unix seconds) as promslog writes times: RFC 3339, UTC,
/// milliseconds.
fn rfc3339_millis(now: f64) -> String {
    let millis = (now * 1000.0).floor() as i64;
    match chrono::Utc.timestamp_millis_opt(millis).single() {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        None => String::from("1970-01-01T00:00:00.000Z"),
    }
}

/// promslog's level names.
fn level_name(level: Level) -> &'static str {
    match level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARN",
        Level::INFO => "INFO",
        Level::DEBUG => "DEBUG",
        Level::TRACE => "TRACE",
    }
}

/// Collects an event's message and its other fields, already formatted.
struct Fields {
    msg: String,
    rest: String,
}

impl Fields {
    fn push(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.msg.push_str(value);
            return;
        }
        self.rest.push(' ');
        self.rest.push_str(field.name());
        self.rest.push('=');
        push_value(&mut self.rest, value);
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.push(field, &format!("{value:?}"));
    }
}

/// Appends `value`, quoted and escaped when logfmt needs it: when it is
/// empty or holds a space, `=`, a quote, or a control character.
fn push_value(out: &mut String, value: &str) {
    let plain = !value.is_empty() && !value.chars().any(|c| c == ' ' || c == '=' || c == '"' || c.is_control());
    if plain {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_quoted_only_when_logfmt_needs_it() {
        let cases = [
            ("plain", "plain"),
            ("", "\"\""),
            ("two words", "\"two words\""),
            ("a=b", "\"a=b\""),
            ("say \"hi\"", "\"say \\\"hi\\\"\""),
            ("line\nbreak", "\"line\\nbreak\""),
            ("back\\slash", "back\\slash"),
        ];
        for (value, want) in cases {
            let mut out = String::new();
            push_value(&mut out, value);
            assert_eq!(out, want, "{value:?}");
        }
    }
}
