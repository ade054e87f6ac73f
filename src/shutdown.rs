//! Waiting for the signals that stop the exporter.

use std::future::Future;

use tracing::info;

/// Installs the SIGTERM and SIGINT handlers now, and returns a future that
/// resolves when either arrives. Call it before anything slow happens at
/// start-up: a signal that arrives before the handlers exist ends the
/// process with the default action, leaving a stale socket behind; one that
/// arrives after is held until the exporter has started, and then stops it
/// cleanly. Must be called inside a tokio runtime.
pub fn install() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
        async move {
            match handlers {
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
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C); the handlers are installed when
/// this is first polled. Prefer [`install`].
pub async fn signal() {
    install().await
}
