//! Work that must not run on the runtime's threads nor on tokio's blocking
//! pool (which request handlers can fill, and which shutdown must not wait
//! behind): a named thread of its own, whose result the runtime awaits.

use std::future::Future;

/// Runs `work` on a new thread named `name` and returns a future of its
/// result (`None` if the thread panicked before answering). Fails only if
/// the thread cannot be started.
pub(crate) fn spawn<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<impl Future<Output = Option<T>>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name(name.to_owned()).spawn(move || {
        let _ = tx.send(work());
    })?;
    Ok(async move { rx.await.ok() })
}
