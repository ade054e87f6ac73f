//! The lines the fleet sends, and registering the fleet before the timed
//! run. Every line is written once, up front, by kissbot-client, so the
//! load is the stock client's exact bytes and sending costs no encoding.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kissbot_client::{LlmCall, Message, MonitorClient};

use crate::exporter::{counters, Counters};

/// The models bots report, bot `i` using model `i mod --models`.
const MODELS: [&str; 6] = ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-3.5-turbo", "gpt-4", "mistral-7b-instruct"];

/// The features every bot registers.
const FEATURES: [(&str, bool); 2] = [("llm", true), ("translator", false)];

/// How long the exporter may take to count the registrations.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(60);

/// The lines of every bot, each with its trailing newline.
pub(super) struct Plan {
    /// Bot `i`'s heartbeat.
    pub(super) heartbeat: Vec<Vec<u8>>,
    /// Bot `i`'s llm_usage; its figures vary with `i`.
    pub(super) llm: Vec<Vec<u8>>,
}

impl Plan {
    /// The lines of `bots` bots running as process `pid`.
    pub(super) fn build(bots: usize, models: usize, pid: u32) -> anyhow::Result<Plan> {
        let mut plan = Plan { heartbeat: Vec::with_capacity(bots), llm: Vec::with_capacity(bots) };
        for i in 0..bots {
            let bot = MonitorClient::new(channel(i), pid);
            plan.heartbeat.push(line(&bot, Message::Heartbeat)?);
            let model = MODELS[i % models.clamp(1, MODELS.len())];
            // The figures are whole numbers below the exporter's limits;
            // the latency is written as an integer, as the stock client does.
            let call = LlmCall::new(model, "chat", 100 + (i % 900) as u64, 20 + (i % 300) as u64)
                .latency_ms((200 + i % 2000) as f64);
            plan.llm.push(line(&bot, Message::LlmUsage(call))?);
        }
        Ok(plan)
    }

    /// The number of bots.
    pub(super) fn bots(&self) -> usize {
        self.heartbeat.len()
    }
}

/// Bot `i`'s channel.
fn channel(i: usize) -> String {
    format!("loadbot-{i:05}")
}

/// The line `bot` sends for `message`.
fn line(bot: &MonitorClient, message: Message<'_>) -> anyhow::Result<Vec<u8>> {
    let line = bot.line(&message).with_context(|| format!("cannot write a {} of {}", message.kind(), bot.channel()))?;
    Ok(line.into_bytes())
}

/// Registers every bot over one connection, in writes of about 60 KiB.
pub(super) fn register_all(socket: &Path, bots: usize, pid: u32) -> anyhow::Result<()> {
    let mut s = UnixStream::connect(socket).with_context(|| format!("cannot connect to {}", socket.display()))?;
    let mut buf = Vec::with_capacity(64 * 1024);
    for i in 0..bots {
        buf.extend_from_slice(&line(&MonitorClient::new(channel(i), pid), Message::Register { features: &FEATURES })?);
        if buf.len() > 60 * 1024 {
            s.write_all(&buf)?;
            buf.clear();
        }
    }
    s.write_all(&buf)?;
    Ok(())
}

/// Waits until the exporter has counted a register (or a rejection) for
/// every bot since `base`, so that the timed run starts on a known fleet.
pub(super) fn wait_for_registrations(metrics_url: &str, base: &Counters, bots: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + REGISTER_TIMEOUT;
    loop {
        let c = counters(metrics_url)?.minus(base);
        if c.accepted_register + c.rejected >= bots as f64 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the exporter took {} of {bots} registrations in {} s",
                c.accepted_register,
                REGISTER_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines the load generator wrote by hand before it used
    /// kissbot-client: the bytes sent must not change, or benchmark
    /// results would stop being comparable.
    #[test]
    fn lines_are_the_ones_written_by_hand_before() {
        let pid = 4242;
        let plan = Plan::build(1001, 3, pid).unwrap();
        assert_eq!(plan.bots(), 1001);
        let i = 1000;
        let channel = "loadbot-01000";
        assert_eq!(
            plan.heartbeat[i],
            format!("{{\"type\": \"heartbeat\", \"channel\": \"{channel}\", \"pid\": {pid}}}\n").into_bytes()
        );
        let model = MODELS[i % 3];
        let want = format!(
            r#"{{"type": "llm_usage", "channel": "{channel}", "model": "{model}", "feature": "chat", "tokens_in": {}, "tokens_out": {}, "latency_ms": {}, "pid": {pid}}}"#,
            100 + i % 900,
            20 + i % 300,
            200 + i % 2000
        );
        assert_eq!(String::from_utf8(plan.llm[i].clone()).unwrap(), want + "\n");
        let register = line(&MonitorClient::new(channel, pid), Message::Register { features: &FEATURES }).unwrap();
        assert_eq!(
            String::from_utf8(register).unwrap(),
            format!(
                r#"{{"type": "register", "channel": "{channel}", "pid": {pid}, "features": {{"llm": true, "translator": false}}}}"#
            ) + "\n"
        );
    }

    #[test]
    fn models_cycle_within_the_table() {
        let plan = Plan::build(8, 100, 1).unwrap();
        let text = String::from_utf8(plan.llm[7].clone()).unwrap();
        assert!(text.contains(&format!("\"model\": \"{}\"", MODELS[1])), "{text}");
        let plan = Plan::build(3, 0, 1).unwrap();
        assert!(plan.llm.iter().all(|l| String::from_utf8_lossy(l).contains("\"gpt-4o-mini\"")));
    }
}
