//! Waiting for the signals that stop the exporter.

use tracing::info;

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => info!(signal = "SIGTERM", "shutting down"),
                    _ = int.recv() => info!(signal = "SIGINT", "shutting down"),
                }
            }
            _ => {
                // Without signal handlers, Ctrl-C is the only way left.
                let _ = tokio::signal::ctrl_c().await;
                info!(signal = "SIGINT", "shutting down");
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
