//! A fire-and-forget client for KissBot chat bots written in Rust: it speaks
//! the same protocol as the stock Python client, so a bot can use it against
//! `kissbot-exporter` or the legacy monitor alike.
//!
//! The client never panics and never blocks longer than its timeout (2 s by
//! default, connect and write together). Every method reports whether the
//! line was *delivered to the socket*; a bot is expected to ignore the answer
//! and carry on, exactly as with the stock client. It keeps one connection
//! open and reconnects on the next send after any error, so an exporter that
//! restarts is picked up again without the bot doing anything.
//!
//! It uses only the standard library, `serde_json` (to write and escape each
//! line exactly as Python's `json.dumps` does) and `socket2` (a connect that
//! honours the timeout, and writes that never raise `SIGPIPE`), and has no
//! `unsafe` code of its own.
//!
//! ```no_run
//! use std::time::Duration;
//! use kissbot_client::{LlmCall, MonitorClient};
//!
//! let client = MonitorClient::new("el_serda", std::process::id());
//! client.register(&[("llm", true), ("translator", false)]);
//! client.start_heartbeat(Duration::from_secs(30));
//!
//! // ... after each LLM call:
//! client.log_llm_usage(&LlmCall::new("gpt-4o-mini", "jokes", 145, 87).latency_ms(1850.0));
//!
//! // On a clean shutdown:
//! client.stop_heartbeat();
//! client.unregister();
//! ```
//!
//! A message the exporter would reject (an empty or over-long channel, a
//! negative or absurd number) is not sent: [`MonitorClient::send`] says why,
//! with the `reason` the exporter would have counted.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

// The modules are private and their public items are re-exported here, so
// the crate's API is one flat namespace and the split can change freely.
//
// - `api`: the client, its kept connection and the heartbeat thread.
// - `wire`: the messages and the byte-exact line for each, with the checks
//   the exporter makes on them.
// - `transport`: connecting and writing within a deadline, without SIGPIPE.
mod api;
mod transport;
mod wire;

pub use api::{MonitorClient, DEFAULT_SOCKET_PATH, DEFAULT_TIMEOUT, MIN_HEARTBEAT_INTERVAL};
pub use wire::{LlmCall, Message, MAX_CHANNEL_BYTES};
