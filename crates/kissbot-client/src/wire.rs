//! What goes on the wire: the messages, the checks the exporter makes on
//! them, and the byte-exact line the stock Python client writes for each.
//!
//! Nothing here does I/O; [`encode`] turns one message into one line.

use std::io;

use serde::ser::{SerializeMap, Serializer};

/// The longest channel name the exporter accepts, in bytes. Longer channels
/// are refused rather than cut, because the channel is a bot's identity.
///
/// The exporter's own limit is `kissbot_exporter::event::MAX_LABEL_BYTES`; a
/// test of the exporter checks that the two stay equal.
pub const MAX_CHANNEL_BYTES: usize = 128;

// The exporter's other limits (`MAX_TOKENS`, `MAX_COST_USD`, `MAX_LATENCY_MS`
// and `MAX_PID` in its `event` module). They are private because a bot has
// no use for them; the exporter's tests/it/client.rs sends values on both sides
// of each one through this encoder and its parser, so a change on one side
// alone fails there.

/// The largest token count the exporter accepts for one call.
const MAX_TOKENS: u64 = 1_000_000_000;

/// The largest cost the exporter accepts for one call, in USD.
const MAX_COST_USD: f64 = 1_000_000.0;

/// The longest latency the exporter accepts for one call: one day, in
/// milliseconds.
const MAX_LATENCY_MS: f64 = 86_400_000.0;

/// The largest process id the exporter accepts.
const MAX_PID: u32 = i32::MAX as u32;
/// `MAX_TRACE_ID_BYTES` in the exporter's `event` module.
const MAX_TRACE_ID_BYTES: usize = 64;

/// One LLM call, as reported with
/// [`MonitorClient::log_llm_usage`](crate::MonitorClient::log_llm_usage).
///
/// ```
/// use kissbot_client::LlmCall;
///
/// let call = LlmCall::new("gpt-4o", "translate", 1200, 300).latency_ms(840.5).cost_usd(0.006);
/// assert_eq!(call.tokens_in, 1200);
/// assert_eq!(call.cost_usd, Some(0.006));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LlmCall<'a> {
    /// The model name, e.g. `gpt-4o-mini`. Names longer than 128 bytes are
    /// cut by the exporter.
    pub model: &'a str,
    /// The bot feature that made the call, e.g. `jokes`.
    pub feature: &'a str,
    /// Prompt tokens.
    pub tokens_in: u64,
    /// Completion tokens.
    pub tokens_out: u64,
    /// How long the call took, in milliseconds, if measured.
    pub latency_ms: Option<f64>,
    /// What the call cost in USD, if the bot knows; otherwise the exporter
    /// prices it from its table.
    pub cost_usd: Option<f64>,
    /// The provider serving the model (e.g. `openai`), if the bot knows.
    pub provider: Option<&'a str>,
    /// Prompt tokens served from the provider's cache (part of `tokens_in`).
    pub tokens_cached: Option<u64>,
    /// True when the call failed; it is then counted as an error.
    pub failed: bool,
    /// Time to the first token of a streamed answer, in milliseconds, if
    /// measured.
    pub ttft_ms: Option<f64>,
    /// Why the call failed: `timeout`, `rate_limit`, `auth`, `server`,
    /// `client` or `other` (the exporter counts any other name as `other`).
    /// Sent as `error_type`, which marks the call as failed by itself.
    pub error_type: Option<&'a str>,
    /// The id of the trace the call belongs to (at most 64 of `0-9A-Za-z_-`),
    /// shown as the exemplar of the call's latency bucket so that a slow
    /// bucket on a dashboard leads to the trace.
    pub trace_id: Option<&'a str>,
}

impl<'a> LlmCall<'a> {
    /// A call with no latency and no cost.
    ///
    /// ```
    /// use kissbot_client::LlmCall;
    ///
    /// let call = LlmCall::new("gpt-4", "jokes", 145, 87);
    /// assert_eq!((call.latency_ms, call.cost_usd), (None, None));
    /// ```
    pub fn new(model: &'a str, feature: &'a str, tokens_in: u64, tokens_out: u64) -> LlmCall<'a> {
        LlmCall {
            model,
            feature,
            tokens_in,
            tokens_out,
            latency_ms: None,
            cost_usd: None,
            provider: None,
            tokens_cached: None,
            failed: false,
            ttft_ms: None,
            error_type: None,
            trace_id: None,
        }
    }

    /// Sets the latency in milliseconds.
    ///
    /// ```
    /// use kissbot_client::LlmCall;
    ///
    /// assert_eq!(LlmCall::new("m", "f", 1, 1).latency_ms(12.5).latency_ms, Some(12.5));
    /// ```
    pub fn latency_ms(mut self, ms: f64) -> LlmCall<'a> {
        self.latency_ms = Some(ms);
        self
    }

    /// Sets the cost in USD.
    ///
    /// ```
    /// use kissbot_client::LlmCall;
    ///
    /// assert_eq!(LlmCall::new("m", "f", 1, 1).cost_usd(0.25).cost_usd, Some(0.25));
    /// ```
    pub fn cost_usd(mut self, usd: f64) -> LlmCall<'a> {
        self.cost_usd = Some(usd);
        self
    }

    /// Sets the provider.
    ///
    /// ```
    /// use kissbot_client::LlmCall;
    ///
    /// assert_eq!(LlmCall::new("m", "f", 1, 1).provider("openai").provider, Some("openai"));
    /// ```
    pub fn provider(mut self, provider: &'a str) -> LlmCall<'a> {
        self.provider = Some(provider);
        self
    }

    /// Sets how many of the prompt tokens came from the provider's cache.
    ///
    /// ```
    /// use kissbot_client::LlmCall;
    ///
    /// assert_eq!(LlmCall::new("m", "f", 100, 1).tokens_cached(60).tokens_cached, Some(60));
    /// ```
    pub fn tokens_cached(mut self, tokens: u64) -> LlmCall<'a> {
        self.tokens_cached = Some(tokens);
        self
    }

    /// Marks the call as failed (sent as `"status": "error"`).
    ///
    /// ```
    /// use kissbot_client::LlmCall;
    ///
    /// assert!(LlmCall::new("m", "f", 100, 0).failed().failed);
    /// ```
    pub fn failed(mut self) -> LlmCall<'a> {
        self.failed = true;
        self
    }

    /// Sets the time to the first token in milliseconds.
    ///
    /// ```
    /// use kissbot_client::LlmCall;
    ///
    /// assert_eq!(LlmCall::new("m", "f", 1, 1).ttft_ms(380.5).ttft_ms, Some(380.5));
    /// ```
    pub fn ttft_ms(mut self, ms: f64) -> LlmCall<'a> {
        self.ttft_ms = Some(ms);
        self
    }

    /// Marks the call as failed and says why (`timeout`, `rate_limit`,
    /// `auth`, `server`, `client`, `other`).
    ///
    /// ```
    /// use kissbot_client::LlmCall;
    ///
    /// let call = LlmCall::new("m", "f", 100, 0).error_type("rate_limit");
    /// assert_eq!((call.failed, call.error_type), (true, Some("rate_limit")));
    /// ```
    pub fn error_type(mut self, error_type: &'a str) -> LlmCall<'a> {
        self.failed = true;
        self.error_type = Some(error_type);
        self
    }

    /// Names the trace the call belongs to, e.g. the hex trace id of the
    /// OpenTelemetry span around it. The exporter refuses the whole call if
    /// the id is longer than 64 bytes or has characters other than
    /// `0-9A-Za-z_-` (an altered id would name no trace), and so does the
    /// client before sending; an empty id is no id.
    ///
    /// ```
    /// use kissbot_client::LlmCall;
    ///
    /// let call = LlmCall::new("m", "f", 1, 1).trace_id("4bf92f3577b34da6a3ce929d0e0e4736");
    /// assert_eq!(call.trace_id, Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    /// ```
    pub fn trace_id(mut self, trace_id: &'a str) -> LlmCall<'a> {
        self.trace_id = Some(trace_id);
        self
    }
}

/// One message of the protocol, for
/// [`MonitorClient::send`](crate::MonitorClient::send). The channel and pid
/// come from the client.
///
/// ```no_run
/// use kissbot_client::{Message, MonitorClient};
///
/// let client = MonitorClient::new("el_serda", 12345);
/// if let Err(e) = client.send(&Message::Heartbeat) {
///     eprintln!("monitor not reachable: {e}");
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Message<'a> {
    /// The bot started, with its named features and whether each is on.
    Register {
        /// Feature names and flags, written in this order.
        features: &'a [(&'a str, bool)],
    },
    /// The bot is alive.
    Heartbeat,
    /// The bot is shutting down cleanly.
    Unregister,
    /// The bot made one LLM call.
    LlmUsage(LlmCall<'a>),
}

impl Message<'_> {
    /// The `type` field on the wire.
    ///
    /// ```
    /// use kissbot_client::Message;
    ///
    /// assert_eq!(Message::Heartbeat.kind(), "heartbeat");
    /// ```
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Register { .. } => "register",
            Message::Heartbeat => "heartbeat",
            Message::Unregister => "unregister",
            Message::LlmUsage(_) => "llm_usage",
        }
    }
}

/// Builds the line (with its trailing newline) the stock client would write
/// for `message` from the bot on `channel` running as `pid`, or says why it
/// is not sent: a register, heartbeat or unregister without a pid, a number
/// JSON cannot carry, or anything the exporter would reject.
pub(crate) fn encode(channel: &str, pid: Option<u32>, message: &Message<'_>) -> io::Result<String> {
    let pid = match (message, pid) {
        (Message::LlmUsage(_), pid) => pid,
        (_, Some(pid)) => Some(pid),
        (_, None) => return Err(invalid(format!("a {} needs a pid and this client has none", message.kind()))),
    };
    if let Message::LlmUsage(call) = message {
        // JSON has no NaN or infinity (serde_json would write null and the
        // value would vanish without a trace).
        for (name, value) in [("latency_ms", call.latency_ms), ("cost_usd", call.cost_usd), ("ttft_ms", call.ttft_ms)] {
            if value.is_some_and(|v| !v.is_finite()) {
                return Err(invalid(format!("{name} is not a finite number")));
            }
        }
    }
    if let Err(Rejected { reason, detail }) = check(channel, pid, message) {
        return Err(invalid(format!("the exporter would reject this {} ({reason}): {detail}", message.kind())));
    }
    let mut buf = Vec::with_capacity(160);
    write_line(&mut buf, channel, pid, message).map_err(|e| invalid(format!("cannot encode the message: {e}")))?;
    buf.push(b'\n');
    // serde_json writes valid UTF-8 and the formatter only adds ASCII.
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn invalid(detail: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, detail)
}

/// Why the exporter would reject a message: its `reason` label (the value
/// of `kissbot_exporter_messages_rejected_total{reason}`) and a detail.
struct Rejected {
    reason: &'static str,
    detail: String,
}

impl Rejected {
    fn new(reason: &'static str, detail: impl Into<String>) -> Rejected {
        Rejected { reason, detail: detail.into() }
    }
}

/// The checks of the exporter's parser that a line of this encoder can
/// fail, made in the exporter's order so that the reason given is the one
/// the exporter would count. Everything else the parser checks (types,
/// required fields, UTF-8) the encoder gets right by construction, and
/// model and feature names that are too long are cut by the exporter, not
/// refused.
fn check(channel: &str, pid: Option<u32>, message: &Message<'_>) -> Result<(), Rejected> {
    if channel.trim().is_empty() {
        return Err(Rejected::new("missing_field", "field \"channel\" is empty"));
    }
    if channel.len() > MAX_CHANNEL_BYTES {
        return Err(Rejected::new(
            "label_too_long",
            format!("channel is {} bytes, the limit is {MAX_CHANNEL_BYTES}", channel.len()),
        ));
    }
    let call = match message {
        Message::Register { .. } | Message::Heartbeat | Message::Unregister => return check_pid(pid),
        Message::LlmUsage(call) => call,
    };
    check_label(call.model, "model")?;
    check_label(call.feature, "feature")?;
    check_tokens(call.tokens_in, "tokens_in")?;
    check_tokens(call.tokens_out, "tokens_out")?;
    check_number(call.latency_ms, "latency_ms", MAX_LATENCY_MS)?;
    check_pid(pid)?;
    check_number(call.cost_usd, "cost_usd", MAX_COST_USD)?;
    if let Some(cached) = call.tokens_cached {
        check_tokens(cached, "tokens_cached")?;
        if cached > call.tokens_in {
            return Err(Rejected::new(
                "invalid_value",
                format!("tokens_cached {cached} is more than tokens_in {}", call.tokens_in),
            ));
        }
    }
    check_number(call.ttft_ms, "ttft_ms", MAX_LATENCY_MS)?;
    if let Some(id) = call.trace_id.filter(|id| !id.is_empty()) {
        if id.len() > MAX_TRACE_ID_BYTES {
            return Err(Rejected::new(
                "invalid_value",
                format!("trace_id of {} bytes is longer than {MAX_TRACE_ID_BYTES}", id.len()),
            ));
        }
        if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return Err(Rejected::new("invalid_value", "trace_id has characters outside [0-9A-Za-z_-]"));
        }
    }
    // An error type without "status": "error" is taken by the exporter as
    // a failed call; the encoder never writes "status": "ok", so it cannot
    // send the contradiction the exporter refuses.
    Ok(())
}

fn check_pid(pid: Option<u32>) -> Result<(), Rejected> {
    match pid {
        Some(n) if n == 0 || n > MAX_PID => Err(Rejected::new("invalid_value", format!("pid {n} is out of range"))),
        _ => Ok(()),
    }
}

fn check_label(value: &str, field: &str) -> Result<(), Rejected> {
    if value.is_empty() {
        return Err(Rejected::new("missing_field", format!("field {field:?} is empty")));
    }
    Ok(())
}

fn check_tokens(n: u64, field: &str) -> Result<(), Rejected> {
    if n > MAX_TOKENS {
        return Err(Rejected::new("invalid_value", format!("{field} {n} is above the limit {MAX_TOKENS}")));
    }
    Ok(())
}

/// A latency or cost, already known to be finite.
fn check_number(value: Option<f64>, field: &str, max: f64) -> Result<(), Rejected> {
    match value {
        Some(x) if x < 0.0 || x > max => {
            Err(Rejected::new("invalid_value", format!("{field} {x} is out of range 0..={max}")))
        }
        _ => Ok(()),
    }
}

/// Writes the message the way the stock Python client does: `json.dumps`
/// of a dict with `type` first, `", "` and `": "` separators, non-ASCII
/// escaped as `\uXXXX`. Whole-number floats are written as integers, as the
/// stock client sends its latency.
fn write_line(buf: &mut Vec<u8>, channel: &str, pid: Option<u32>, message: &Message<'_>) -> serde_json::Result<()> {
    let mut ser = serde_json::Serializer::with_formatter(buf, PythonFormatter);
    let mut map = ser.serialize_map(None)?;
    map.serialize_entry("type", message.kind())?;
    map.serialize_entry("channel", channel)?;
    match message {
        Message::Register { features } => {
            map.serialize_entry("pid", &pid)?;
            map.serialize_entry("features", &OrderedFeatures(features))?;
        }
        Message::Heartbeat | Message::Unregister => map.serialize_entry("pid", &pid)?,
        Message::LlmUsage(call) => {
            map.serialize_entry("model", call.model)?;
            map.serialize_entry("feature", call.feature)?;
            map.serialize_entry("tokens_in", &call.tokens_in)?;
            map.serialize_entry("tokens_out", &call.tokens_out)?;
            if let Some(ms) = call.latency_ms {
                map.serialize_entry("latency_ms", &Number(ms))?;
            }
            if let Some(pid) = pid {
                map.serialize_entry("pid", &pid)?;
            }
            if let Some(usd) = call.cost_usd {
                map.serialize_entry("cost_usd", &Number(usd))?;
            }
            if let Some(provider) = call.provider {
                map.serialize_entry("provider", provider)?;
            }
            if let Some(cached) = call.tokens_cached {
                map.serialize_entry("tokens_cached", &cached)?;
            }
            if call.failed {
                map.serialize_entry("status", "error")?;
            }
            if let Some(ms) = call.ttft_ms {
                map.serialize_entry("ttft_ms", &Number(ms))?;
            }
            if let Some(error_type) = call.error_type {
                map.serialize_entry("error_type", error_type)?;
            }
            if let Some(id) = call.trace_id.filter(|id| !id.is_empty()) {
                map.serialize_entry("trace_id", id)?;
            }
        }
    }
    map.end()
}

/// Features as a JSON object in the caller's order (a map type would sort).
struct OrderedFeatures<'a>(&'a [(&'a str, bool)]);

impl serde::Serialize for OrderedFeatures<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, on) in self.0 {
            map.serialize_entry(name, on)?;
        }
        map.end()
    }
}

/// A float written as an integer when it is a whole number that fits.
struct Number(f64);

impl serde::Serialize for Number {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let x = self.0;
        if x.fract() == 0.0 && x.abs() < 9.0e15 {
            s.serialize_i64(x as i64)
        } else {
            s.serialize_f64(x)
        }
    }
}

/// `json.dumps` defaults: `", "` and `": "` separators, `ensure_ascii`.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_object_key<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(&mut self, w: &mut W, fragment: &str) -> io::Result<()> {
        // Quotes, backslashes and control characters never reach here;
        // serde_json escapes them itself, as Python does.
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if (' '..='~').contains(&c) {
                continue;
            }
            w.write_all(&fragment.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                write!(w, "\\u{unit:04x}")?;
            }
            start = i + c.len_utf8();
        }
        w.write_all(&fragment.as_bytes()[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stock Python client's exact lines.
    const REGISTER: &str =
        r#"{"type": "register", "channel": "el_serda", "pid": 12345, "features": {"llm": true, "translator": false}}"#;
    const HEARTBEAT: &str = r#"{"type": "heartbeat", "channel": "el_serda", "pid": 12345}"#;
    const LLM_USAGE: &str = r#"{"type": "llm_usage", "channel": "el_serda", "model": "gpt-4", "feature": "jokes", "tokens_in": 145, "tokens_out": 87, "latency_ms": 1850}"#;
    const UNREGISTER: &str = r#"{"type": "unregister", "channel": "el_serda", "pid": 12345}"#;
    const BACKGROUND: &str = r#"{"type": "llm_usage", "channel": "44456636", "model": "gpt-3.5-turbo", "feature": "gen_long", "tokens_in": 153, "tokens_out": 178}"#;

    fn line(channel: &str, pid: Option<u32>, m: Message<'_>) -> String {
        encode(channel, pid, &m).unwrap().trim_end_matches('\n').to_owned()
    }

    /// The error `encode` gives for a message it refuses.
    fn refused(channel: &str, pid: Option<u32>, m: Message<'_>) -> String {
        let err = encode(channel, pid, &m).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        err.to_string()
    }

    #[test]
    fn lines_match_the_stock_client_byte_for_byte() {
        let pid = Some(12345);
        assert_eq!(
            line("el_serda", pid, Message::Register { features: &[("llm", true), ("translator", false)] }),
            REGISTER
        );
        assert_eq!(line("el_serda", pid, Message::Heartbeat), HEARTBEAT);
        assert_eq!(line("el_serda", pid, Message::Unregister), UNREGISTER);
        let call = LlmCall::new("gpt-4", "jokes", 145, 87).latency_ms(1850.0);
        assert_eq!(line("el_serda", None, Message::LlmUsage(call)), LLM_USAGE);
        let call = LlmCall::new("gpt-3.5-turbo", "gen_long", 153, 178);
        assert_eq!(line("44456636", None, Message::LlmUsage(call)), BACKGROUND);
        assert!(encode("el_serda", pid, &Message::Heartbeat).unwrap().ends_with("}\n"));
    }

    #[test]
    fn optional_fields_follow_the_stock_ones() {
        let call = LlmCall::new("m", "f", 1, 2).latency_ms(12.5).cost_usd(0.000_5);
        assert_eq!(
            line("a", Some(7), Message::LlmUsage(call)),
            r#"{"type": "llm_usage", "channel": "a", "model": "m", "feature": "f", "tokens_in": 1, "tokens_out": 2, "latency_ms": 12.5, "pid": 7, "cost_usd": 0.0005}"#
        );
        let call = LlmCall::new("m", "f", 10, 2).provider("openai").tokens_cached(4).failed();
        assert_eq!(
            line("a", Some(7), Message::LlmUsage(call)),
            r#"{"type": "llm_usage", "channel": "a", "model": "m", "feature": "f", "tokens_in": 10, "tokens_out": 2, "pid": 7, "provider": "openai", "tokens_cached": 4, "status": "error"}"#
        );
        let call = LlmCall::new("m", "f", 10, 2).ttft_ms(120.0).error_type("timeout");
        assert_eq!(
            line("a", None, Message::LlmUsage(call)),
            r#"{"type": "llm_usage", "channel": "a", "model": "m", "feature": "f", "tokens_in": 10, "tokens_out": 2, "status": "error", "ttft_ms": 120, "error_type": "timeout"}"#
        );
        assert_eq!(
            line("a", Some(7), Message::Register { features: &[] }),
            r#"{"type": "register", "channel": "a", "pid": 7, "features": {}}"#
        );
    }

    #[test]
    fn strings_are_escaped_like_python() {
        assert_eq!(
            line("caf\u{e9} \"q\"\n\\ \u{1F600}\u{7f}", Some(1), Message::Heartbeat),
            r#"{"type": "heartbeat", "channel": "caf\u00e9 \"q\"\n\\ \ud83d\ude00\u007f", "pid": 1}"#
        );
        assert_eq!(
            line("a", Some(1), Message::Register { features: &[("\u{e9}t\u{e9}\t", true)] }),
            r#"{"type": "register", "channel": "a", "pid": 1, "features": {"\u00e9t\u00e9\t": true}}"#
        );
    }

    #[test]
    fn whole_floats_are_written_as_integers() {
        let call = LlmCall::new("m", "f", 1, 1).latency_ms(250.0).cost_usd(2.0);
        let l = line("a", None, Message::LlmUsage(call));
        assert!(l.contains(r#""latency_ms": 250, "cost_usd": 2}"#), "{l}");
        let l = line("a", None, Message::LlmUsage(LlmCall::new("m", "f", 1, 1).latency_ms(0.25)));
        assert!(l.ends_with(r#""latency_ms": 0.25}"#), "{l}");
    }

    #[test]
    fn what_the_exporter_would_reject_is_not_sent() {
        let long = "x".repeat(MAX_CHANNEL_BYTES + 1);
        let err = refused(&long, Some(1), Message::Heartbeat);
        assert!(err.contains("(label_too_long)"), "{err}");
        assert!(encode(&"x".repeat(MAX_CHANNEL_BYTES), Some(1), &Message::Heartbeat).is_ok());
        assert!(refused("", Some(1), Message::Heartbeat).contains("(missing_field)"));
        assert!(refused(" \t", Some(1), Message::Heartbeat).contains("(missing_field)"));
        assert!(refused("a", Some(0), Message::Heartbeat).contains("(invalid_value)"));
        assert!(refused("a", Some(MAX_PID + 1), Message::Unregister).contains("(invalid_value)"));
        assert!(encode("a", Some(MAX_PID), &Message::Heartbeat).is_ok());
        for (call, reason) in [
            (LlmCall::new("", "f", 1, 1), "(missing_field)"),
            (LlmCall::new("m", "", 1, 1), "(missing_field)"),
            (LlmCall::new("m", "f", 1, 1).latency_ms(-1.0), "(invalid_value)"),
            (LlmCall::new("m", "f", 1, 1).latency_ms(MAX_LATENCY_MS + 1.0), "(invalid_value)"),
            (LlmCall::new("m", "f", 1, 1).cost_usd(-0.5), "(invalid_value)"),
            (LlmCall::new("m", "f", 1, 1).cost_usd(MAX_COST_USD * 2.0), "(invalid_value)"),
            (LlmCall::new("m", "f", 1, 1).cost_usd(f64::NAN), "cost_usd is not a finite number"),
            (LlmCall::new("m", "f", 1, 1).latency_ms(f64::INFINITY), "latency_ms is not a finite number"),
            (LlmCall::new("m", "f", u64::MAX, 1), "(invalid_value)"),
            (LlmCall::new("m", "f", 1, MAX_TOKENS + 1), "(invalid_value)"),
            (LlmCall::new("m", "f", 1, 1).tokens_cached(2), "(invalid_value)"),
        ] {
            let err = refused("a", Some(1), Message::LlmUsage(call));
            assert!(err.contains(reason), "{call:?}: {err}");
        }
        assert!(refused("a", None, Message::Heartbeat).contains("needs a pid"));
        assert!(refused("a", None, Message::Register { features: &[] }).contains("needs a pid"));
    }

    #[test]
    fn the_limits_themselves_are_accepted() {
        let long_model = "m".repeat(500);
        let call = LlmCall::new(&long_model, "f", MAX_TOKENS, MAX_TOKENS)
            .latency_ms(MAX_LATENCY_MS)
            .cost_usd(MAX_COST_USD)
            .tokens_cached(MAX_TOKENS);
        assert!(encode("a", Some(MAX_PID), &Message::LlmUsage(call)).is_ok());
        let call = LlmCall::new("m", "f", 0, 0).latency_ms(0.0).cost_usd(-0.0).tokens_cached(0);
        assert!(encode("a", None, &Message::LlmUsage(call)).is_ok());
    }
}
