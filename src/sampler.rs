//! Samples the bots' processes (CPU, memory, liveness) with `sysinfo`, on a
//! dedicated thread.
//!
//! The old monitor sampled on its event loop, and a slow sample froze the
//! whole fleet. Here the thread takes the state lock only to copy the list of
//! pids and, after the slow part, to store the results; a stuck `/proc`
//! read delays nothing but the next sample.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus::Gauge;
use sysinfo::{Pid, ProcessRefreshKind, ProcessStatus, ProcessesToUpdate, System};
use tracing::debug;

use crate::clock::unix_now;
use crate::state::{Sample, SampleResult, State};

/// Settings of the sampler thread.
#[derive(Debug, Clone)]
pub(crate) struct SamplerConfig {
    /// Time between passes.
    pub(crate) interval: Duration,
    /// Artificial delay added to each pass (tests only).
    pub(crate) test_delay: Duration,
}

/// Gauges the sampler maintains about itself.
#[derive(Clone)]
pub(crate) struct SamplerMetrics {
    /// Duration of the last pass, in seconds.
    pub(crate) duration: Gauge,
    /// Unix time of the last completed pass.
    pub(crate) last_success: Gauge,
}

/// Starts the sampler thread. It stops when `stop` is dropped or receives a
/// message (checked between passes).
pub(crate) fn spawn(
    state: Arc<Mutex<State>>,
    config: SamplerConfig,
    metrics: SamplerMetrics,
    stop: Receiver<()>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("kissbot-sampler".into()).spawn(move || {
        // sysinfo keeps /proc/<pid>/stat open per process by default; with
        // thousands of bots that would be thousands of descriptors.
        sysinfo::set_open_files_limit(0);
        let mut system = System::new();
        loop {
            pass(&state, &config, &metrics, &mut system);
            match stop.recv_timeout(config.interval) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        debug!("sampler stopped");
    })
}

fn pass(state: &Mutex<State>, config: &SamplerConfig, metrics: &SamplerMetrics, system: &mut System) {
    let started = Instant::now();
    let targets = state.lock().unwrap_or_else(|e| e.into_inner()).sample_targets();
    if !config.test_delay.is_zero() {
        std::thread::sleep(config.test_delay);
    }
    let pids: Vec<Pid> = targets.iter().map(|(_, pid)| Pid::from_u32(*pid)).collect();
    // Processes of bots no longer sampled (restarted, unregistered) stay in
    // sysinfo's map; start over when it has grown well past what is sampled,
    // to keep memory bounded. This must happen before the refresh: reset
    // after it, every lookup below would miss and every bot look dead.
    if system.processes().len() > 2 * pids.len() + 64 {
        *system = System::new();
    }
    if !pids.is_empty() {
        system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&pids),
            true,
            ProcessRefreshKind::nothing().with_cpu().with_memory(),
        );
    }
    let samples = targets
        .into_iter()
        .map(|(channel, pid)| {
            let result = match system.process(Pid::from_u32(pid)) {
                None => SampleResult::Gone("process not found"),
                Some(p) if matches!(p.status(), ProcessStatus::Zombie | ProcessStatus::Dead) => {
                    SampleResult::Gone("process is a zombie")
                }
                Some(p) => SampleResult::Alive {
                    cpu_seconds: p.accumulated_cpu_time() as f64 / 1000.0,
                    cpu_pct: f64::from(p.cpu_usage()),
                    rss_bytes: p.memory(),
                    vms_bytes: p.virtual_memory(),
                    start_time: p.start_time(),
                },
            };
            Sample { channel, pid, result }
        })
        .collect();
    state.lock().unwrap_or_else(|e| e.into_inner()).record_samples(samples, unix_now());
    metrics.duration.set(started.elapsed().as_secs_f64());
    metrics.last_success.set(unix_now());
}
