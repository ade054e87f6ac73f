//! The systemd notify protocol (`Type=notify`): `READY=1` once the socket and
//! HTTP listen, `STOPPING=1` when the drain begins, and watchdog pings while
//! the runtime runs. Each is a no-op when `NOTIFY_SOCKET` is not set.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, info};

fn send(state: NotifyState<'_>) {
    // A failed notification must not stop the exporter: without a service
    // manager listening there is nothing to tell.
    if let Err(e) = sd_notify::notify(&[state]) {
        debug!(error = %e, "service manager notification failed");
    }
}

/// Tells the service manager that start-up is complete.
pub(crate) fn ready() {
    send(NotifyState::Ready);
}

/// Tells the service manager that the exporter is shutting down.
pub(crate) fn stopping() {
    send(NotifyState::Stopping);
}

/// When the service manager asked for a watchdog (`WatchdogSec=`, seen as
/// `WATCHDOG_USEC`), pings it at half the interval from a runtime task: a
/// runtime that stops scheduling tasks stops the pings, and systemd restarts
/// the service. The task ends with the runtime.
pub(crate) fn spawn_watchdog() {
    let Some(timeout) = sd_notify::watchdog_enabled() else { return };
    let every = (timeout / 2).max(Duration::from_millis(10));
    info!(interval = ?every, "pinging the systemd watchdog");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            send(NotifyState::Watchdog);
        }
    });
}
