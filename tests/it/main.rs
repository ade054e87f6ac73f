//! The integration tests, as one binary (as ripgrep does): every module runs
//! the real `kissbot-exporter` binary against a real Unix socket, a real
//! SQLite file in a temp dir and real HTTP, or checks the monitoring bundle
//! with the real `promtool`, `prometheus` and `alertmanager`. Tests that need
//! a tool or root print `SKIP:` where it is missing and fail instead under
//! `CI` where CI provides it.

mod bundle_support;
mod common;
mod servers;

mod budgets;
mod bundle;
mod bundle_e2e;
mod client;
mod crash;
mod daemon;
mod db_fault;
mod docs;
mod exemplars;
mod expiry_e2e;
mod fleet_e2e;
mod fuzz_corpus;
mod genai;
mod golden;
mod hostile;
mod http_security;
mod landing;
mod legacy_db;
mod links;
mod listen;
mod logging;
mod pricing;
mod process;
mod property;
mod reload;
mod soak;
mod store;
mod systemd;
mod truth;
