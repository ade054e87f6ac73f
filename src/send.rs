//! `kissbot-exporter send`: one message from the command line, through
//! [`MonitorClient`] of the `kissbot-client` crate, for shell-script bots,
//! cron jobs and smoke tests.

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use kissbot_client::{LlmCall, Message, MonitorClient, DEFAULT_SOCKET_PATH};

use crate::config::parse_duration;

/// The message kinds `send` can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// The bot started (`--pid` required; `--feature` for each feature).
    Register,
    /// The bot is alive (`--pid` required).
    Heartbeat,
    /// The bot is shutting down cleanly (`--pid` required).
    Unregister,
    /// One LLM call (`--model`, `--feature-name`, `--tokens-in`, `--tokens-out` required).
    LlmUsage,
}

/// Flags of `kissbot-exporter send`.
///
/// ```
/// use clap::Parser;
/// use kissbot_exporter::send::{Kind, SendArgs};
///
/// #[derive(Parser)]
/// struct Cli {
///     #[command(flatten)]
///     send: SendArgs,
/// }
/// let cli = Cli::parse_from(["send", "heartbeat", "--channel", "el_serda", "--pid", "12345"]);
/// assert_eq!(cli.send.kind, Kind::Heartbeat);
/// assert_eq!(cli.send.pid, Some(12345));
/// ```
#[derive(Debug, Clone, Args)]
pub struct SendArgs {
    /// What to send.
    #[arg(value_enum)]
    pub kind: Kind,

    /// The bot's channel.
    #[arg(long)]
    pub channel: String,

    /// The bot's process id (required except for llm-usage).
    #[arg(long, required_if_eq_any = [("kind", "register"), ("kind", "heartbeat"), ("kind", "unregister")])]
    pub pid: Option<u32>,

    /// A feature of a register, as `name=true` or `name=false` (`name` alone means true); repeatable.
    #[arg(long = "feature", value_name = "NAME=BOOL", value_parser = parse_feature)]
    pub features: Vec<(String, bool)>,

    /// The model of an llm-usage.
    #[arg(long, required_if_eq("kind", "llm-usage"))]
    pub model: Option<String>,

    /// The bot feature that made the LLM call.
    #[arg(long = "feature-name", required_if_eq("kind", "llm-usage"))]
    pub feature_name: Option<String>,

    /// Prompt tokens of the LLM call.
    #[arg(long = "tokens-in", required_if_eq("kind", "llm-usage"))]
    pub tokens_in: Option<u64>,

    /// Completion tokens of the LLM call.
    #[arg(long = "tokens-out", required_if_eq("kind", "llm-usage"))]
    pub tokens_out: Option<u64>,

    /// Latency of the LLM call in milliseconds.
    #[arg(long = "latency-ms")]
    pub latency_ms: Option<f64>,

    /// Cost of the LLM call in USD (otherwise the exporter prices it).
    #[arg(long = "cost-usd")]
    pub cost_usd: Option<f64>,

    /// The provider serving the model (e.g. `openai`).
    #[arg(long)]
    pub provider: Option<String>,

    /// Prompt tokens served from the provider's cache (at most --tokens-in).
    #[arg(long = "tokens-cached")]
    pub tokens_cached: Option<u64>,

    /// Mark the LLM call as failed (`"status": "error"`).
    #[arg(long)]
    pub failed: bool,

    /// Time to the first token of the LLM call in milliseconds.
    #[arg(long = "ttft-ms")]
    pub ttft_ms: Option<f64>,

    /// Why the LLM call failed (timeout, rate_limit, auth, server, client, other); implies --failed.
    #[arg(long = "error-type")]
    pub error_type: Option<String>,

    /// The trace the LLM call belongs to (at most 64 of 0-9A-Za-z_-), shown as its latency exemplar.
    #[arg(long = "trace-id")]
    pub trace_id: Option<String>,

    /// Path of the exporter's Unix socket.
    #[arg(long = "socket.path", env = "KISSBOT_EXPORTER_SOCKET_PATH", default_value = DEFAULT_SOCKET_PATH)]
    pub socket_path: PathBuf,

    /// Give up after this long (connect and write together).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
}

impl SendArgs {
    /// Sends the message; `Ok` once it is delivered to the socket.
    ///
    /// ```no_run
    /// use clap::Parser;
    /// use kissbot_exporter::send::SendArgs;
    ///
    /// #[derive(Parser)]
    /// struct Cli {
    ///     #[command(flatten)]
    ///     send: SendArgs,
    /// }
    /// let cli = Cli::parse_from(["send", "heartbeat", "--channel", "el_serda", "--pid", "12345"]);
    /// if let Err(e) = cli.send.execute() {
    ///     eprintln!("{e}");
    /// }
    /// ```
    pub fn execute(&self) -> io::Result<()> {
        let client = match self.pid {
            Some(pid) => MonitorClient::new(self.channel.clone(), pid),
            None => MonitorClient::usage_only(self.channel.clone()),
        }
        .socket_path(&self.socket_path)
        .timeout(self.timeout);
        let features: Vec<(&str, bool)> = self.features.iter().map(|(n, on)| (n.as_str(), *on)).collect();
        let message = match self.kind {
            Kind::Register => Message::Register { features: &features },
            Kind::Heartbeat => Message::Heartbeat,
            Kind::Unregister => Message::Unregister,
            Kind::LlmUsage => {
                // clap makes these required for llm-usage; the error is for
                // callers that build SendArgs by hand.
                let missing =
                    |flag: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("llm-usage needs {flag}"));
                Message::LlmUsage(LlmCall {
                    model: self.model.as_deref().ok_or_else(|| missing("--model"))?,
                    feature: self.feature_name.as_deref().ok_or_else(|| missing("--feature-name"))?,
                    tokens_in: self.tokens_in.ok_or_else(|| missing("--tokens-in"))?,
                    tokens_out: self.tokens_out.ok_or_else(|| missing("--tokens-out"))?,
                    latency_ms: self.latency_ms,
                    cost_usd: self.cost_usd,
                    provider: self.provider.as_deref(),
                    tokens_cached: self.tokens_cached,
                    failed: self.failed || self.error_type.is_some(),
                    ttft_ms: self.ttft_ms,
                    error_type: self.error_type.as_deref(),
                    trace_id: self.trace_id.as_deref(),
                })
            }
        };
        client.send(&message).map_err(|e| {
            io::Error::new(e.kind(), format!("{} not delivered to {}: {e}", message.kind(), self.socket_path.display()))
        })
    }

    /// Sends the message and turns the outcome into the exit status: 0 when
    /// delivered, 1 with a one-line error on stderr when not.
    ///
    /// ```no_run
    /// use clap::Parser;
    /// use kissbot_exporter::send::SendArgs;
    ///
    /// #[derive(Parser)]
    /// struct Cli {
    ///     #[command(flatten)]
    ///     send: SendArgs,
    /// }
    /// let code = Cli::parse_from(["send", "heartbeat", "--channel", "a", "--pid", "1"]).send.run();
    /// # let _ = code;
    /// ```
    pub fn run(&self) -> ExitCode {
        match self.execute() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kissbot-exporter send: {e}");
                ExitCode::FAILURE
            }
        }
    }
}

/// Parses `name=true`, `name=false` or a bare `name` (true).
fn parse_feature(s: &str) -> Result<(String, bool), String> {
    let (name, value) = s.split_once('=').unwrap_or((s, "true"));
    if name.is_empty() {
        return Err(format!("{s:?}: the feature name is empty"));
    }
    let on = match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => true,
        "false" | "0" | "no" | "off" => false,
        _ => return Err(format!("{s:?}: expected NAME=true or NAME=false")),
    };
    Ok((name.to_owned(), on))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features() {
        assert_eq!(parse_feature("llm=true"), Ok(("llm".into(), true)));
        assert_eq!(parse_feature("translator=false"), Ok(("translator".into(), false)));
        assert_eq!(parse_feature("llm"), Ok(("llm".into(), true)));
        assert!(parse_feature("=true").is_err());
        assert!(parse_feature("llm=maybe").is_err());
    }
}
