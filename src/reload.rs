//! Re-reading the pricing file and the budgets file: on SIGHUP (a handler installed before
//! anything slow happens at start-up) and on `POST /-/reload`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::budget::Budgets;
use crate::metrics::Metrics;
use crate::pricing::PriceTable;
use crate::state::State;

/// Re-reads the pricing file and the budgets file and swaps them into the
/// state. A bad file is refused with the reason, and both files in force
/// stay: a reload takes effect whole or not at all.
pub(crate) struct Reloader {
    path: Option<PathBuf>,
    budgets: Option<PathBuf>,
    state: Arc<Mutex<State>>,
    metrics: Metrics,
}

impl Reloader {
    /// A reloader for `path` (none: the embedded table only) into `state`.
    pub(crate) fn new(path: Option<PathBuf>, state: Arc<Mutex<State>>, metrics: Metrics) -> Reloader {
        Reloader { path, budgets: None, state, metrics }
    }

    /// Also re-reads this budgets file (none: no budgets).
    pub(crate) fn with_budgets(mut self, budgets: Option<PathBuf>) -> Reloader {
        self.budgets = budgets;
        self
    }

    /// Reloads now (blocking: it reads a file). Returns the refusal reason.
    pub(crate) fn reload(&self) -> std::result::Result<(), String> {
        let budgets = match self.budgets.as_deref().map(Budgets::load).transpose() {
            Ok(b) => b,
            Err(e) => {
                self.metrics.config_reloads.with_label_values(&["failure"]).inc();
                self.metrics.config_last_reload_successful.set(0);
                warn!(error = %e, "budgets reload refused; the previous budgets and prices stay in force");
                return Err(e.to_string());
            }
        };
        let result = self.reload_pricing();
        // Only once the pricing file was accepted too, so that a reload is
        // all or nothing.
        if let (Ok(()), Some(budgets), Some(path)) = (&result, budgets, &self.budgets) {
            let n = budgets.len();
            self.state.lock().unwrap_or_else(|e| e.into_inner()).set_budgets(budgets);
            info!(path = %path.display(), budgets = n, "budgets file reloaded");
        }
        result
    }

    fn reload_pricing(&self) -> std::result::Result<(), String> {
        let Some(path) = &self.path else {
            info!("reload requested; no pricing file configured, the embedded table stays");
            self.metrics.config_reloads.with_label_values(&["success"]).inc();
            self.metrics.config_last_reload_successful.set(1);
            return Ok(());
        };
        match PriceTable::load(path) {
            Ok(table) => {
                self.state.lock().unwrap_or_else(|e| e.into_inner()).set_pricing(table);
                self.metrics.config_reloads.with_label_values(&["success"]).inc();
                self.metrics.config_last_reload_successful.set(1);
                info!(path = %path.display(), "pricing file reloaded");
                Ok(())
            }
            Err(e) => {
                self.metrics.config_reloads.with_label_values(&["failure"]).inc();
                self.metrics.config_last_reload_successful.set(0);
                warn!(error = %e, "pricing reload refused; the previous table stays in force");
                Err(e.to_string())
            }
        }
    }
}

/// Reloads the pricing file on every SIGHUP. Installed before anything slow
/// happens at start-up; a HUP that arrives before the pricing is loaded is
/// logged and otherwise ignored (the file is read at start anyway).
#[cfg(unix)]
pub(crate) async fn reload_on_sighup(
    hup: std::io::Result<tokio::signal::unix::Signal>,
    reloader: Arc<std::sync::OnceLock<Arc<Reloader>>>,
    shutdown: CancellationToken,
) {
    let Ok(mut hup) = hup else {
        warn!("cannot install the SIGHUP handler; reload with POST /-/reload instead");
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = hup.recv() => if r.is_none() { return },
        }
        let Some(r) = reloader.get().cloned() else {
            info!(signal = "SIGHUP", "ignored: still starting, the pricing file is not loaded yet");
            continue;
        };
        info!(signal = "SIGHUP", "reloading the pricing file");
        let _ = tokio::task::spawn_blocking(move || r.reload()).await;
    }
}

#[cfg(not(unix))]
pub(crate) async fn reload_on_sighup(
    _hup: std::io::Result<()>,
    _reloader: Arc<std::sync::OnceLock<Arc<Reloader>>>,
    _shutdown: CancellationToken,
) {
}
