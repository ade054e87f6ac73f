//! What the exporter's integration tests and its load generator share: one
//! plain HTTP/1.1 client for a single request, and one parser for the
//! Prometheus text exposition. Standard library only.

pub mod http;
pub mod metrics;
