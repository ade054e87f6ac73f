//! Re-reading the pricing file and the budgets file: on SIGHUP (a handler installed before
//! anything slow happens at start-up) and on `POST /-/reload`.
//!
//! Reloads take turns: each one reads both files, checks them and applies
//! them (or refuses them and says so in the metrics) before the next one
//! starts reading. Without turns, a reload that read an older version of a
//! file could apply it after a newer reload had answered 200.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::budget::Budgets;
use crate::metrics::Metrics;
use crate::own_thread;
use crate::pricing::PriceTable;
use crate::state::State;

/// Re-reads the pricing file and the budgets file and swaps them into the
/// state. A bad file is refused with the reason, and both files in force
/// stay: a reload takes effect whole or not at all.
pub(crate) struct Reloader {
    pricing: Option<PathBuf>,
    budgets: Option<PathBuf>,
    state: Arc<Mutex<State>>,
    metrics: Metrics,
    /// Held by the reload in progress from before it reads the files until
    /// it has applied them and set the metrics. Tokio's mutex serves its
    /// waiters first come, first served, so every reload reads the files
    /// after the one before it has finished, and the last one asked for is
    /// the one in force.
    turn: tokio::sync::Mutex<()>,
}

/// What a reload read and accepted.
struct Files {
    /// The new table; none without a pricing file (the embedded table stays).
    pricing: Option<PriceTable>,
    /// The new budgets; none without a budgets file.
    budgets: Option<Budgets>,
}

/// Why a reload was refused, by the file at fault.
enum Refused {
    /// The budgets file was refused (the pricing file was not read).
    Budgets(String),
    /// The pricing file was refused.
    Pricing(String),
    /// The files could not be read at all (no thread to read them on).
    Reading(String),
}

/// Reads and checks both files; blocking. The budgets file comes first, as
/// it always has, so its refusal is the one reported when both are bad.
fn read_files(pricing: Option<&Path>, budgets: Option<&Path>) -> Result<Files, Refused> {
    let budgets = budgets.map(Budgets::load).transpose().map_err(|e| Refused::Budgets(e.to_string()))?;
    let pricing = pricing.map(PriceTable::load).transpose().map_err(|e| Refused::Pricing(e.to_string()))?;
    Ok(Files { pricing, budgets })
}

impl Reloader {
    /// A reloader for the pricing file `pricing` (none: the embedded table
    /// only) and the budgets file `budgets` (none: no budgets) into `state`.
    pub(crate) fn new(
        pricing: Option<PathBuf>,
        budgets: Option<PathBuf>,
        state: Arc<Mutex<State>>,
        metrics: Metrics,
    ) -> Reloader {
        Reloader { pricing, budgets, state, metrics, turn: tokio::sync::Mutex::new(()) }
    }

    /// Reloads both files, after any reload already in progress or waiting,
    /// and returns the refusal reason. The reload runs as a task of its own,
    /// so it completes, and the metrics tell its outcome, even if whoever
    /// asked (an HTTP client) goes away.
    pub(crate) async fn reload(self: &Arc<Self>) -> Result<(), String> {
        let this = self.clone();
        match tokio::spawn(async move { this.reload_in_turn().await }).await {
            Ok(r) => r,
            Err(e) => Err(format!("reload task failed: {e}")),
        }
    }

    async fn reload_in_turn(&self) -> Result<(), String> {
        let _turn = self.turn.lock().await;
        let (pricing, budgets) = (self.pricing.clone(), self.budgets.clone());
        // Reading blocks, so it happens off the runtime, and on a thread of
        // its own rather than on the blocking pool: the runtime waits for
        // the pool when it shuts down, and a read must never hold up the
        // exit.
        let read = match own_thread::spawn("kissbot-reload", move || read_files(pricing.as_deref(), budgets.as_deref()))
        {
            Ok(read) => read.await.unwrap_or_else(|| Err(Refused::Reading("the reading thread stopped".into()))),
            Err(e) => Err(Refused::Reading(format!("cannot start a thread to read the files: {e}"))),
        };
        let files = match read {
            Ok(files) => files,
            Err(refused) => {
                self.metrics.config_reloads.with_label_values(&["failure"]).inc();
                self.metrics.config_last_reload_successful.set(0);
                let reason = match refused {
                    Refused::Budgets(e) => {
                        warn!(error = %e, "budgets reload refused; the previous budgets and prices stay in force");
                        e
                    }
                    Refused::Pricing(e) => {
                        warn!(error = %e, "pricing reload refused; the previous table stays in force");
                        e
                    }
                    Refused::Reading(e) => {
                        warn!(error = %e, "reload refused; the previous budgets and prices stay in force");
                        e
                    }
                };
                return Err(reason);
            }
        };
        let budgets_len = files.budgets.as_ref().map(Budgets::len);
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(table) = files.pricing {
                state.set_pricing(table);
            }
            if let Some(budgets) = files.budgets {
                state.set_budgets(budgets);
            }
        }
        self.metrics.config_reloads.with_label_values(&["success"]).inc();
        self.metrics.config_last_reload_successful.set(1);
        match &self.pricing {
            Some(path) => info!(path = %path.display(), "pricing file reloaded"),
            None => info!("reload requested; no pricing file configured, the embedded table stays"),
        }
        if let (Some(path), Some(n)) = (&self.budgets, budgets_len) {
            info!(path = %path.display(), budgets = n, "budgets file reloaded");
        }
        Ok(())
    }
}

/// Reloads the pricing and budgets files on every SIGHUP. Installed before
/// anything slow happens at start-up; a HUP that arrives before the files
/// are loaded is logged and otherwise ignored (they are read at start
/// anyway). Signals that arrive during a reload make one more reload after
/// it.
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
        info!(signal = "SIGHUP", "reloading the pricing and budgets files");
        // The outcome is logged and counted by the reload itself.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = r.reload() => {}
        }
    }
}

#[cfg(not(unix))]
pub(crate) async fn reload_on_sighup(
    _hup: std::io::Result<()>,
    _reloader: Arc<std::sync::OnceLock<Arc<Reloader>>>,
    _shutdown: CancellationToken,
) {
}
