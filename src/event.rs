//! Messages the bots send, and the validation that turns a raw line into one.
//!
//! Parsing borrows from the line wherever the JSON has no escapes, and every
//! field is read as a loosely typed scalar first, so that a wrong type is
//! reported against the field that has it instead of failing the whole
//! document with an opaque serde message.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// Longest channel name accepted, and longest label value, in bytes. Longer
/// channels are rejected (they are identities); longer model and feature
/// names are accepted whole and stored whole in `llm_usage`, and only their
/// labels are cut to this length (by the state, which keys series by them).
pub const MAX_LABEL_BYTES: usize = 128;

/// Largest token count accepted for one call; anything above is a broken sender.
pub const MAX_TOKENS: u64 = 1_000_000_000;

/// Largest cost accepted for one call, in USD.
pub const MAX_COST_USD: f64 = 1_000_000.0;

/// Longest latency (and time to first token) accepted for one call: one day,
/// in milliseconds.
pub const MAX_LATENCY_MS: f64 = 86_400_000.0;

/// The longest `trace_id` accepted, in bytes. With the label name it stays
/// well inside the 128 characters OpenMetrics allows an exemplar's labels.
pub(crate) const MAX_TRACE_ID_BYTES: usize = 64;

/// Largest process id accepted (Linux caps pid_max at 2^22).
pub(crate) const MAX_PID: i64 = i32::MAX as i64;

/// A validated message from a bot.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A bot started.
    Register {
        /// The bot's channel, its identity.
        channel: String,
        /// The bot's process id.
        pid: u32,
        /// Named features and whether they are enabled, sorted by name.
        features: Vec<(String, bool)>,
    },
    /// A bot is alive.
    Heartbeat {
        /// The bot's channel.
        channel: String,
        /// The bot's process id.
        pid: u32,
    },
    /// A bot is shutting down cleanly.
    Unregister {
        /// The bot's channel.
        channel: String,
        /// The bot's process id.
        pid: u32,
    },
    /// A bot made one LLM call.
    LlmUsage(LlmUsage),
}

/// One LLM call as reported by a bot.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmUsage {
    /// The bot's channel.
    pub channel: String,
    /// The model name as sent.
    pub model: String,
    /// The bot feature that made the call.
    pub feature: String,
    /// Prompt tokens.
    pub tokens_in: u64,
    /// Completion tokens.
    pub tokens_out: u64,
    /// Call latency in milliseconds, when the sender measured it.
    pub latency_ms: Option<f64>,
    /// The sender's process id, when given.
    pub pid: Option<u32>,
    /// Cost in USD reported by the sender (`cost_usd` or `estimated_cost`).
    pub reported_cost_usd: Option<f64>,
    /// True when the model or feature name is longer than
    /// [`MAX_LABEL_BYTES`]: the names stay whole here and in the row, and
    /// their labels are cut.
    pub truncated: bool,
    /// The provider, when the sender names it (e.g. `openai`).
    pub provider: Option<String>,
    /// Input tokens served from the provider's cache (part of `tokens_in`).
    pub tokens_cached: u64,
    /// True when the sender reported the call as failed (`"status": "error"`,
    /// or an `error_type` without a `status`).
    pub error: bool,
    /// The sender's trace id for the call, when given: at most
    /// `MAX_TRACE_ID_BYTES` of `[0-9A-Za-z_-]`. It becomes the exemplar of
    /// the call's latency bucket, linking the metric to the trace.
    pub trace_id: Option<String>,
    /// Time to the first token in milliseconds, when the sender streamed the
    /// answer and measured it.
    pub ttft_ms: Option<f64>,
    /// Why the call failed: `Some` exactly when `error` is true, and
    /// `ErrorType::Other` when the sender did not say why.
    pub error_type: Option<ErrorType>,
}

/// Why an LLM call failed: the closed set of `error_type` label values of
/// `kissbot_llm_errors_total`. The wire field is free text; names outside
/// the set are kept as [`ErrorType::Other`] so the label stays bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorType {
    /// The call timed out.
    Timeout,
    /// The provider refused the call for a rate or quota limit.
    RateLimit,
    /// The credentials were refused.
    Auth,
    /// The provider failed (5xx).
    Server,
    /// The provider refused the request itself (4xx other than the above).
    Client,
    /// Anything else, and failed calls that do not say why.
    Other,
}

impl ErrorType {
    /// Every error type, in the order the metric lists them; the index of a
    /// type in this array is `type as usize`.
    pub(crate) const ALL: [ErrorType; 6] = [
        ErrorType::Timeout,
        ErrorType::RateLimit,
        ErrorType::Auth,
        ErrorType::Server,
        ErrorType::Client,
        ErrorType::Other,
    ];

    /// The label and database value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::Timeout => "timeout",
            ErrorType::RateLimit => "rate_limit",
            ErrorType::Auth => "auth",
            ErrorType::Server => "server",
            ErrorType::Client => "client",
            ErrorType::Other => "other",
        }
    }

    /// Reads a wire value, case-insensitively; unknown names are `other`,
    /// because a sender's own vocabulary must not grow the label set.
    pub(crate) fn parse(s: &str) -> ErrorType {
        let s = s.trim();
        ErrorType::ALL.into_iter().find(|t| t.as_str().eq_ignore_ascii_case(s)).unwrap_or(ErrorType::Other)
    }
}

impl Event {
    /// Every message type, as [`Event::kind`] names them.
    pub(crate) const KINDS: [&'static str; 4] = ["register", "heartbeat", "unregister", "llm_usage"];

    /// The message type as it appears on the wire, used as a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Register { .. } => "register",
            Event::Heartbeat { .. } => "heartbeat",
            Event::Unregister { .. } => "unregister",
            Event::LlmUsage(_) => "llm_usage",
        }
    }

    /// The pid the message names, if any.
    pub(crate) fn pid(&self) -> Option<u32> {
        match self {
            Event::Register { pid, .. } | Event::Heartbeat { pid, .. } | Event::Unregister { pid, .. } => Some(*pid),
            Event::LlmUsage(u) => u.pid,
        }
    }

    /// The channel the message is about.
    pub fn channel(&self) -> &str {
        match self {
            Event::Register { channel, .. } | Event::Heartbeat { channel, .. } | Event::Unregister { channel, .. } => {
                channel
            }
            Event::LlmUsage(u) => &u.channel,
        }
    }
}

/// Why a line was not accepted. The reason is a metric label, so the set is
/// closed; the detail is for the log line only.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// The closed-set reason, e.g. `invalid_json`.
    pub reason: Reason,
    /// A human-readable detail for logs (never a label).
    pub(crate) detail: String,
}

/// The closed set of rejection reasons, exported as `reason` label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The line is not valid UTF-8.
    InvalidUtf8,
    /// The line is not a JSON object.
    InvalidJson,
    /// The line is longer than the configured limit.
    LineTooLong,
    /// The `type` field is absent or empty.
    MissingType,
    /// The `type` is not one of the four known message types.
    UnknownType,
    /// A required field is absent or null.
    MissingField,
    /// A field has the wrong JSON type.
    InvalidField,
    /// A field has the right type but an impossible value.
    InvalidValue,
    /// A channel name is longer than [`MAX_LABEL_BYTES`].
    LabelTooLong,
    /// An unregister named a pid that is not the registered one.
    PidMismatch,
    /// A new bot could not be tracked because the bot limit is reached.
    TooManyBots,
    /// The message's pid is not the sending process (`--socket.verify-pid=enforce`).
    PeerPidMismatch,
}

impl Reason {
    /// Every reason, for pre-registering label values.
    pub(crate) const ALL: [Reason; 12] = [
        Reason::InvalidUtf8,
        Reason::InvalidJson,
        Reason::LineTooLong,
        Reason::MissingType,
        Reason::UnknownType,
        Reason::MissingField,
        Reason::InvalidField,
        Reason::InvalidValue,
        Reason::LabelTooLong,
        Reason::PidMismatch,
        Reason::TooManyBots,
        Reason::PeerPidMismatch,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::InvalidJson => "invalid_json",
            Reason::LineTooLong => "line_too_long",
            Reason::MissingType => "missing_type",
            Reason::UnknownType => "unknown_type",
            Reason::MissingField => "missing_field",
            Reason::InvalidField => "invalid_field",
            Reason::InvalidValue => "invalid_value",
            Reason::LabelTooLong => "label_too_long",
            Reason::PidMismatch => "pid_mismatch",
            Reason::TooManyBots => "too_many_bots",
            Reason::PeerPidMismatch => "peer_pid_mismatch",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Rejection {
    /// Builds a rejection from a reason and a detail.
    pub(crate) fn new(reason: Reason, detail: impl Into<String>) -> Rejection {
        Rejection { reason, detail: detail.into() }
    }
}

/// A JSON value seen through the eyes of a validator: scalars are kept,
/// containers are skipped (their content is never needed except `features`).
#[derive(Debug)]
enum Scalar<'a> {
    Str(Cow<'a, str>),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Bool(bool),
    Null,
    Container,
}

impl Scalar<'_> {
    fn type_name(&self) -> &'static str {
        match self {
            Scalar::Str(_) => "string",
            Scalar::Unsigned(_) | Scalar::Signed(_) => "integer",
            Scalar::Float(_) => "float",
            Scalar::Bool(_) => "boolean",
            Scalar::Null => "null",
            Scalar::Container => "array or object",
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Scalar::Unsigned(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Scalar::Signed(v))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Container)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Container)
            }
        }
        d.deserialize_any(V)
    }
}

/// The `features` object: feature name to enabled flag. Non-boolean values
/// are kept as "not a bool" so the validator can reject them by name.
#[derive(Debug, Default)]
struct Features<'a>(Vec<(Cow<'a, str>, Scalar<'a>)>);

impl<'de: 'a, 'a> Deserialize<'de> for Features<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Features<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of booleans")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<Cow<'de, str>, Scalar<'de>>()? {
                    out.push((k, v));
                }
                Ok(Features(out))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Features::default())
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Features::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Err(de::Error::custom("features must be an object"))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Err(E::custom("features must be an object"))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Err(E::custom("features must be an object"))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Err(E::custom("features must be an object"))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Err(E::custom("features must be an object"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Err(E::custom("features must be an object"))
            }
        }
        d.deserialize_any(V)
    }
}

/// The wire shape. Unknown fields are ignored, as the protocol requires.
#[derive(Deserialize, Default)]
struct Raw<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Scalar<'a>>,
    #[serde(borrow)]
    channel: Option<Scalar<'a>>,
    #[serde(borrow)]
    pid: Option<Scalar<'a>>,
    #[serde(borrow)]
    features: Option<Scalar<'a>>,
    #[serde(borrow)]
    model: Option<Scalar<'a>>,
    #[serde(borrow)]
    feature: Option<Scalar<'a>>,
    #[serde(borrow)]
    tokens_in: Option<Scalar<'a>>,
    #[serde(borrow)]
    tokens_out: Option<Scalar<'a>>,
    #[serde(borrow)]
    latency_ms: Option<Scalar<'a>>,
    #[serde(borrow)]
    cost_usd: Option<Scalar<'a>>,
    #[serde(borrow)]
    estimated_cost: Option<Scalar<'a>>,
    #[serde(borrow)]
    provider: Option<Scalar<'a>>,
    #[serde(borrow)]
    tokens_cached: Option<Scalar<'a>>,
    #[serde(borrow)]
    status: Option<Scalar<'a>>,
    #[serde(borrow)]
    trace_id: Option<Scalar<'a>>,
    ttft_ms: Option<Scalar<'a>>,
    #[serde(borrow)]
    error_type: Option<Scalar<'a>>,
}

/// Parses and validates one line (without its trailing newline).
pub fn parse_line(line: &[u8]) -> Result<Event, Rejection> {
    let text = std::str::from_utf8(line)
        .map_err(|e| Rejection::new(Reason::InvalidUtf8, format!("invalid utf-8 at byte {}", e.valid_up_to())))?;
    // Deserialising `features` needs the map's content; every other field
    // needs only scalars. Do it in two passes only when the line is a
    // register, which is rare compared with heartbeats and usage.
    let raw: Raw<'_> = serde_json::from_str(text)
        .map_err(|e| Rejection::new(Reason::InvalidJson, format!("not a json object: {e}")))?;
    let kind = match raw.kind {
        None | Some(Scalar::Null) => return Err(Rejection::new(Reason::MissingType, "field \"type\" is missing")),
        Some(Scalar::Str(ref s)) if s.is_empty() => {
            return Err(Rejection::new(Reason::MissingType, "field \"type\" is empty"))
        }
        Some(Scalar::Str(ref s)) => s.clone(),
        Some(ref other) => {
            return Err(Rejection::new(
                Reason::InvalidField,
                format!("field \"type\" must be a string, got {}", other.type_name()),
            ))
        }
    };
    match kind.as_ref() {
        kind @ ("register" | "heartbeat" | "unregister") => {
            let channel = channel(&raw)?;
            let pid = pid(raw.pid.as_ref())?.ok_or_else(|| missing("pid"))?;
            Ok(match kind {
                "register" => Event::Register { channel, pid, features: features(text, raw.features.as_ref())? },
                "heartbeat" => Event::Heartbeat { channel, pid },
                _ => Event::Unregister { channel, pid },
            })
        }
        "llm_usage" => {
            let channel = channel(&raw)?;
            let model = label(raw.model.as_ref(), "model")?;
            let feature = label(raw.feature.as_ref(), "feature")?;
            let truncated = [&raw.model, &raw.feature]
                .iter()
                .any(|v| matches!(v, Some(Scalar::Str(s)) if s.len() > MAX_LABEL_BYTES));
            let tokens_in = tokens(raw.tokens_in.as_ref(), "tokens_in")?;
            let tokens_out = tokens(raw.tokens_out.as_ref(), "tokens_out")?;
            let latency_ms = number(raw.latency_ms.as_ref(), "latency_ms", MAX_LATENCY_MS)?;
            let pid = pid(raw.pid.as_ref())?;
            let reported_cost_usd = match number(raw.cost_usd.as_ref(), "cost_usd", MAX_COST_USD)? {
                Some(c) => Some(c),
                None => number(raw.estimated_cost.as_ref(), "estimated_cost", MAX_COST_USD)?,
            };
            let provider = match raw.provider.as_ref() {
                None | Some(Scalar::Null) => None,
                Some(Scalar::Str(s)) if s.is_empty() => None,
                // Never a label, so kept whole like the model's name; the
                // line-length limit bounds it.
                Some(Scalar::Str(s)) => Some(s.clone().into_owned()),
                Some(other) => return Err(wrong_type("provider", "a string", other)),
            };
            let tokens_cached = match raw.tokens_cached.as_ref() {
                None | Some(Scalar::Null) => 0,
                v => tokens(v, "tokens_cached")?,
            };
            if tokens_cached > tokens_in {
                return Err(Rejection::new(
                    Reason::InvalidValue,
                    format!("tokens_cached {tokens_cached} is more than tokens_in {tokens_in}"),
                ));
            }
            let ttft_ms = number(raw.ttft_ms.as_ref(), "ttft_ms", MAX_LATENCY_MS)?;
            let error_type = match raw.error_type.as_ref() {
                None | Some(Scalar::Null) => None,
                Some(Scalar::Str(s)) if s.trim().is_empty() => None,
                Some(Scalar::Str(s)) => Some(ErrorType::parse(s)),
                Some(other) => return Err(wrong_type("error_type", "a string", other)),
            };
            let error = match raw.status.as_ref() {
                // An error type says the call failed, as OpenTelemetry's
                // `error.type` does, when the sender sends no status.
                None | Some(Scalar::Null) => error_type.is_some(),
                Some(Scalar::Str(s)) if s.eq_ignore_ascii_case("ok") => false,
                Some(Scalar::Str(s)) if s.eq_ignore_ascii_case("error") => true,
                Some(Scalar::Str(s)) => {
                    return Err(Rejection::new(
                        Reason::InvalidValue,
                        format!("status {:?} is neither \"ok\" nor \"error\"", truncate(s, 32)),
                    ))
                }
                Some(other) => return Err(wrong_type("status", "a string", other)),
            };
            let trace_id = trace_id(raw.trace_id.as_ref())?;
            if error_type.is_some() && !error {
                return Err(Rejection::new(Reason::InvalidValue, "error_type on a call with status \"ok\""));
            }
            Ok(Event::LlmUsage(LlmUsage {
                channel,
                model,
                feature,
                tokens_in,
                tokens_out,
                latency_ms,
                pid,
                reported_cost_usd,
                truncated,
                provider,
                tokens_cached,
                error,
                trace_id,
                ttft_ms,
                // A failed call that does not say why is counted as `other`.
                error_type: if error { Some(error_type.unwrap_or(ErrorType::Other)) } else { None },
            }))
        }
        other => Err(Rejection::new(Reason::UnknownType, format!("unknown message type {:?}", truncate(other, 64)))),
    }
}

/// Validates `trace_id`. It is checked rather than cut or escaped: it ends
/// up in an exemplar's label set, which OpenMetrics limits to 128 characters,
/// and a trace id that was altered would name no trace at all.
fn trace_id(v: Option<&Scalar<'_>>) -> Result<Option<String>, Rejection> {
    match v {
        // An empty id is no id, as with `provider`: a sender without a
        // trace in scope may well send the field empty.
        None | Some(Scalar::Null) => Ok(None),
        Some(Scalar::Str(s)) if s.is_empty() => Ok(None),
        Some(Scalar::Str(s)) => {
            if s.len() > MAX_TRACE_ID_BYTES {
                return Err(Rejection::new(
                    Reason::InvalidValue,
                    format!("trace_id of {} bytes is longer than {MAX_TRACE_ID_BYTES}", s.len()),
                ));
            }
            if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                return Err(Rejection::new(
                    Reason::InvalidValue,
                    format!("trace_id {:?} has characters outside [0-9A-Za-z_-]", truncate(s, 32)),
                ));
            }
            Ok(Some(s.to_string()))
        }
        Some(other) => Err(wrong_type("trace_id", "a string", other)),
    }
}

fn missing(field: &str) -> Rejection {
    Rejection::new(Reason::MissingField, format!("field {field:?} is missing"))
}

fn wrong_type(field: &str, expected: &str, got: &Scalar<'_>) -> Rejection {
    Rejection::new(Reason::InvalidField, format!("field {field:?} must be {expected}, got {}", got.type_name()))
}

fn channel(raw: &Raw<'_>) -> Result<String, Rejection> {
    match raw.channel.as_ref() {
        None | Some(Scalar::Null) => Err(missing("channel")),
        Some(Scalar::Str(s)) if s.trim().is_empty() => {
            Err(Rejection::new(Reason::MissingField, "field \"channel\" is empty"))
        }
        Some(Scalar::Str(s)) if s.len() > MAX_LABEL_BYTES => Err(Rejection::new(
            Reason::LabelTooLong,
            format!("channel is {} bytes, the limit is {MAX_LABEL_BYTES}", s.len()),
        )),
        Some(Scalar::Str(s)) => Ok(s.clone().into_owned()),
        // Numeric channel ids are common in the wild; senders that forget to
        // quote them still mean the same channel.
        Some(Scalar::Unsigned(n)) => Ok(n.to_string()),
        Some(other) => Err(wrong_type("channel", "a string", other)),
    }
}

/// A model or feature name: required, and kept whole however long (the
/// line-length limit bounds it). It is not rejected when longer than a label
/// may be, because losing a call's tokens would be worse than a cut label;
/// the state cuts the label and the row keeps the name.
fn label(v: Option<&Scalar<'_>>, field: &str) -> Result<String, Rejection> {
    match v {
        None | Some(Scalar::Null) => Err(missing(field)),
        Some(Scalar::Str(s)) if s.is_empty() => {
            Err(Rejection::new(Reason::MissingField, format!("field {field:?} is empty")))
        }
        Some(Scalar::Str(s)) => Ok(s.clone().into_owned()),
        Some(other) => Err(wrong_type(field, "a string", other)),
    }
}

/// An optional pid; callers that require one turn `None` into `missing_field`.
fn pid(v: Option<&Scalar<'_>>) -> Result<Option<u32>, Rejection> {
    let n = match v {
        None | Some(Scalar::Null) => return Ok(None),
        Some(Scalar::Unsigned(n)) => *n as i128,
        Some(Scalar::Signed(n)) => *n as i128,
        Some(other) => return Err(wrong_type("pid", "an integer", other)),
    };
    if n <= 0 || n > MAX_PID as i128 {
        return Err(Rejection::new(Reason::InvalidValue, format!("pid {n} is out of range")));
    }
    // The range check above makes the conversion lossless.
    Ok(Some(n as u32))
}

fn tokens(v: Option<&Scalar<'_>>, field: &str) -> Result<u64, Rejection> {
    match v {
        None | Some(Scalar::Null) => Err(missing(field)),
        Some(Scalar::Unsigned(n)) if *n <= MAX_TOKENS => Ok(*n),
        Some(Scalar::Unsigned(n)) => {
            Err(Rejection::new(Reason::InvalidValue, format!("{field} {n} is above the limit {MAX_TOKENS}")))
        }
        Some(Scalar::Signed(n)) => Err(Rejection::new(Reason::InvalidValue, format!("{field} {n} is negative"))),
        Some(other) => Err(wrong_type(field, "a non-negative integer", other)),
    }
}

/// An optional non-negative finite number, integer or float.
fn number(v: Option<&Scalar<'_>>, field: &str, max: f64) -> Result<Option<f64>, Rejection> {
    let x = match v {
        None | Some(Scalar::Null) => return Ok(None),
        Some(Scalar::Unsigned(n)) => *n as f64,
        Some(Scalar::Signed(n)) => *n as f64,
        Some(Scalar::Float(f)) => *f,
        Some(other) => return Err(wrong_type(field, "a number", other)),
    };
    if !x.is_finite() || x < 0.0 || x > max {
        return Err(Rejection::new(Reason::InvalidValue, format!("{field} {x} is out of range 0..={max}")));
    }
    Ok(Some(x))
}

fn features(text: &str, v: Option<&Scalar<'_>>) -> Result<Vec<(String, bool)>, Rejection> {
    match v {
        None | Some(Scalar::Null) => return Ok(Vec::new()),
        Some(Scalar::Container) => {}
        Some(other) => return Err(wrong_type("features", "an object", other)),
    }
    #[derive(Deserialize)]
    struct OnlyFeatures<'a> {
        #[serde(borrow, default)]
        features: Features<'a>,
    }
    let parsed: OnlyFeatures<'_> = serde_json::from_str(text)
        .map_err(|e| Rejection::new(Reason::InvalidField, format!("field \"features\": {e}")))?;
    let mut out = Vec::with_capacity(parsed.features.0.len());
    for (name, value) in parsed.features.0 {
        let enabled = match value {
            Scalar::Bool(b) => b,
            other => return Err(wrong_type("features.*", "a boolean", &other)),
        };
        if name.is_empty() {
            continue;
        }
        out.push((truncate(&name, MAX_LABEL_BYTES).to_owned(), enabled));
    }
    out.sort();
    out.dedup_by(|a, b| a.0 == b.0);
    Ok(out)
}

/// Cuts a string to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(line: &str) -> Reason {
        parse_line(line.as_bytes()).expect_err(line).reason
    }

    #[test]
    fn every_kind_is_listed() {
        let lines = [
            r#"{"type":"register","channel":"a","pid":1}"#,
            r#"{"type":"heartbeat","channel":"a","pid":1}"#,
            r#"{"type":"unregister","channel":"a","pid":1}"#,
            r#"{"type":"llm_usage","channel":"a","model":"m","feature":"f","tokens_in":1,"tokens_out":1}"#,
        ];
        let kinds: Vec<&str> = lines.iter().map(|l| parse_line(l.as_bytes()).unwrap().kind()).collect();
        assert_eq!(kinds, Event::KINDS);
    }

    #[test]
    fn stock_client_lines() {
        let e = parse_line(br#"{"type": "register", "channel": "el_serda", "pid": 12345, "features": {"llm": true, "translator": false}}"#).unwrap();
        assert_eq!(
            e,
            Event::Register {
                channel: "el_serda".into(),
                pid: 12345,
                features: vec![("llm".into(), true), ("translator".into(), false)]
            }
        );
        let e = parse_line(br#"{"type": "heartbeat", "channel": "el_serda", "pid": 12345}"#).unwrap();
        assert_eq!(e, Event::Heartbeat { channel: "el_serda".into(), pid: 12345 });
        let e = parse_line(br#"{"type": "unregister", "channel": "el_serda", "pid": 12345}"#).unwrap();
        assert_eq!(e, Event::Unregister { channel: "el_serda".into(), pid: 12345 });
        let e = parse_line(br#"{"type": "llm_usage", "channel": "el_serda", "model": "gpt-4", "feature": "jokes", "tokens_in": 145, "tokens_out": 87, "latency_ms": 1850}"#).unwrap();
        let Event::LlmUsage(u) = e else { panic!("not usage") };
        assert_eq!((u.tokens_in, u.tokens_out, u.latency_ms, u.pid), (145, 87, Some(1850.0), None));
        let e = parse_line(br#"{"type": "llm_usage", "channel": "44456636", "model": "gpt-3.5-turbo", "feature": "gen_long", "tokens_in": 153, "tokens_out": 178}"#).unwrap();
        assert_eq!(e.channel(), "44456636");
    }

    #[test]
    fn trace_ids() {
        let trace = |v: &str| {
            let line = format!(
                r#"{{"type":"llm_usage","channel":"a","model":"m","feature":"f","tokens_in":1,"tokens_out":1,"trace_id":{v}}}"#
            );
            parse_line(line.as_bytes()).map(|e| match e {
                Event::LlmUsage(u) => u.trace_id,
                _ => panic!("not usage"),
            })
        };
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(trace(&format!("\"{id}\"")).unwrap().as_deref(), Some(id));
        assert_eq!(trace("\"a_B-9\"").unwrap().as_deref(), Some("a_B-9"));
        assert_eq!(trace("\"\"").unwrap(), None);
        assert_eq!(trace("null").unwrap(), None);
        assert_eq!(trace(&format!("\"{}\"", "a".repeat(64))).unwrap().map(|t| t.len()), Some(64));
        assert_eq!(trace(&format!("\"{}\"", "a".repeat(65))).unwrap_err().reason, Reason::InvalidValue);
        for bad in ["\"a b\"", "\"a\\\"b\"", "\"a.b\"", "\"\u{e9}\"", "\"a}\""] {
            assert_eq!(trace(bad).unwrap_err().reason, Reason::InvalidValue, "{bad}");
        }
        assert_eq!(trace("12").unwrap_err().reason, Reason::InvalidField);
    }

    #[test]
    fn optional_and_unknown_fields() {
        let e = parse_line(br#"{"type":"register","channel":"a","pid":1}"#).unwrap();
        assert!(matches!(e, Event::Register { ref features, .. } if features.is_empty()));
        let e = parse_line(br#"{"type":"register","channel":"a","pid":1,"features":{},"extra":[1,{"x":2}]}"#).unwrap();
        assert_eq!(e.kind(), "register");
        let e = parse_line(br#"{"type":"llm_usage","channel":"a","model":"m","feature":"f","tokens_in":1,"tokens_out":2,"estimated_cost":0.5,"latency_ms":12.5}"#).unwrap();
        let Event::LlmUsage(u) = e else { panic!() };
        assert_eq!((u.reported_cost_usd, u.latency_ms), (Some(0.5), Some(12.5)));
        assert_eq!((u.ttft_ms, u.error_type, u.error), (None, None, false));
    }

    #[test]
    fn time_to_first_token_and_error_types() {
        let usage = |rest: &str| {
            let line = format!(
                r#"{{"type":"llm_usage","channel":"a","model":"m","feature":"f","tokens_in":1,"tokens_out":1{rest}}}"#
            );
            let Event::LlmUsage(u) = parse_line(line.as_bytes()).unwrap() else { panic!("not usage") };
            u
        };
        assert_eq!(usage(r#","ttft_ms":250"#).ttft_ms, Some(250.0));
        assert_eq!(usage(r#","ttft_ms":12.5,"latency_ms":100"#).ttft_ms, Some(12.5));
        assert_eq!(usage(r#","ttft_ms":null"#).ttft_ms, None);
        let e = usage(r#","status":"error","error_type":"RATE_LIMIT""#);
        assert_eq!((e.error, e.error_type), (true, Some(ErrorType::RateLimit)));
        let e = usage(r#","status":"error","error_type":"quota_exceeded""#);
        assert_eq!(e.error_type, Some(ErrorType::Other), "unknown names are other");
        let e = usage(r#","status":"error""#);
        assert_eq!(e.error_type, Some(ErrorType::Other), "a failed call without a type is other");
        let e = usage(r#","error_type":"timeout""#);
        assert_eq!((e.error, e.error_type), (true, Some(ErrorType::Timeout)), "a type without a status is an error");
        let e = usage(r#","status":"ok","error_type":" ""#);
        assert_eq!((e.error, e.error_type), (false, None), "a blank type is no type");
        for t in ErrorType::ALL {
            assert_eq!(ErrorType::parse(t.as_str()), t);
            assert_eq!(ErrorType::ALL[t as usize], t);
        }
    }

    #[test]
    fn rejections() {
        assert_eq!(reason("not json"), Reason::InvalidJson);
        assert_eq!(reason("[1,2]"), Reason::InvalidJson);
        assert_eq!(reason(r#"{"channel":"a"}"#), Reason::MissingType);
        assert_eq!(reason(r#"{"type":"","channel":"a"}"#), Reason::MissingType);
        assert_eq!(reason(r#"{"type":"explode","channel":"a"}"#), Reason::UnknownType);
        assert_eq!(reason(r#"{"type":"heartbeat","pid":1}"#), Reason::MissingField);
        assert_eq!(reason(r#"{"type":"heartbeat","channel":"","pid":1}"#), Reason::MissingField);
        assert_eq!(reason(r#"{"type":"heartbeat","channel":"a"}"#), Reason::MissingField);
        assert_eq!(reason(r#"{"type":"heartbeat","channel":"a","pid":"1"}"#), Reason::InvalidField);
        assert_eq!(reason(r#"{"type":"heartbeat","channel":"a","pid":-1}"#), Reason::InvalidValue);
        assert_eq!(reason(r#"{"type":"heartbeat","channel":["a"],"pid":1}"#), Reason::InvalidField);
        let usage = |rest: &str| format!(r#"{{"type":"llm_usage","channel":"a","model":"m","feature":"f",{rest}}}"#);
        assert_eq!(reason(&usage(r#""tokens_in":-5,"tokens_out":1"#)), Reason::InvalidValue);
        assert_eq!(reason(&usage(r#""tokens_in":1.5,"tokens_out":1"#)), Reason::InvalidField);
        assert_eq!(reason(&usage(r#""tokens_in":18446744073709551616,"tokens_out":1"#)), Reason::InvalidField);
        assert_eq!(reason(&usage(r#""tokens_in":1,"tokens_out":1,"latency_ms":"NaN""#)), Reason::InvalidField);
        assert_eq!(reason(&usage(r#""tokens_in":1,"tokens_out":1,"cost_usd":-1"#)), Reason::InvalidValue);
        assert_eq!(reason(&usage(r#""tokens_in":1,"tokens_out":1,"cost_usd":1e300"#)), Reason::InvalidValue);
        assert_eq!(reason(&usage(r#""tokens_in":1"#)), Reason::MissingField);
        assert_eq!(reason(&usage(r#""tokens_in":1,"tokens_out":1,"ttft_ms":"fast""#)), Reason::InvalidField);
        assert_eq!(reason(&usage(r#""tokens_in":1,"tokens_out":1,"ttft_ms":-1"#)), Reason::InvalidValue);
        assert_eq!(reason(&usage(r#""tokens_in":1,"tokens_out":1,"ttft_ms":1e300"#)), Reason::InvalidValue);
        assert_eq!(reason(&usage(r#""tokens_in":1,"tokens_out":1,"ttft_ms":86400001"#)), Reason::InvalidValue);
        assert_eq!(
            reason(&usage(r#""tokens_in":1,"tokens_out":1,"status":"error","error_type":429"#)),
            Reason::InvalidField
        );
        assert_eq!(
            reason(&usage(r#""tokens_in":1,"tokens_out":1,"status":"error","error_type":["x"]"#)),
            Reason::InvalidField
        );
        assert_eq!(
            reason(&usage(r#""tokens_in":1,"tokens_out":1,"status":"ok","error_type":"auth""#)),
            Reason::InvalidValue
        );
        assert_eq!(reason(r#"{"type":"register","channel":"a","pid":1,"features":{"x":1}}"#), Reason::InvalidField);
        assert_eq!(reason(r#"{"type":"register","channel":"a","pid":1,"features":"x"}"#), Reason::InvalidField);
        let long = "x".repeat(MAX_LABEL_BYTES + 1);
        assert_eq!(reason(&format!(r#"{{"type":"heartbeat","channel":"{long}","pid":1}}"#)), Reason::LabelTooLong);
        assert_eq!(parse_line(b"\xff\xfe").unwrap_err().reason, Reason::InvalidUtf8);
        let deep = "[".repeat(10_000);
        assert_eq!(reason(&format!(r#"{{"type":"heartbeat","channel":"a","pid":1,"x":{deep}}}"#)), Reason::InvalidJson);
    }

    #[test]
    fn the_client_crate_refuses_channels_at_the_same_length() {
        // kissbot-client cannot depend on this crate, so it keeps a copy of
        // the limit to refuse what this parser would reject.
        assert_eq!(kissbot_client::MAX_CHANNEL_BYTES, MAX_LABEL_BYTES);
    }

    #[test]
    fn escaped_and_non_ascii_strings() {
        let e = parse_line(r#"{"type":"heartbeat","channel":"caf\u00e9 \"q\"\n","pid":7}"#.as_bytes()).unwrap();
        assert_eq!(e.channel(), "café \"q\"\n");
        let long_model = "é".repeat(100);
        let line = format!(
            r#"{{"type":"llm_usage","channel":"a","model":"{long_model}","feature":"f","tokens_in":1,"tokens_out":1}}"#
        );
        let Event::LlmUsage(u) = parse_line(line.as_bytes()).unwrap() else { panic!() };
        assert_eq!(u.model, long_model, "kept whole; only its label is cut");
        assert!(u.truncated);
    }
}
